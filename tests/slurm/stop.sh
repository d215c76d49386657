#!/usr/bin/env bash
# Stops the one-node SLURM that tests/slurm/start.sh started (munged is left: it is harmless).
pkill -x slurmd || true
pkill -x slurmctld || true
