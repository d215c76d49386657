"""train.profile_steps=A:B: a torch.profiler trace of optimizer steps A..B (CPU, and CUDA kernels on
GPUs), one file per rank in the run's TensorBoard directory (open it in Perfetto or chrome://tracing)."""

import torch


class StepProfiler:
    def __init__(self, spec, directory, rank):
        self.first, self.last = (int(v) for v in spec.split(":")) if spec else (0, -1)
        self.directory, self.rank = str(directory), rank
        self.profiler = None

    def begin(self, step):
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            handler = torch.profiler.tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}")
            self.profiler = torch.profiler.profile(activities=activities, on_trace_ready=handler)
            self.profiler.start()

    def end(self, step):
        if self.profiler is not None and step == self.last:
            self.profiler.stop()  # writes the trace
            self.profiler = None
