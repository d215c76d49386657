"""A Fathom Transformer as a transformers model: AutoModelForCausalLM, generate(), lm-eval.

The model's modules are the Transformer's own, registered under the same names, so one
model.safetensors serves `tools.pretrained.from_pretrained` and `AutoModelForCausalLM.from_pretrained`
alike, and the forward pass is the Transformer's. generate() decodes with Fathom's DecodeCache
(model/decode.py): keys, values and the running sums of every cumulative mean, which no
transformers cache layer holds.
"""

from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.decode import DecodeCache
from model.transformer import Transformer
from tools.hf.configuration_fathom import FathomHFConfig


class FathomCache(DecodeCache, Cache):
    """Fathom's DecodeCache, seen by generate() as a Cache of no transformers layers."""

    # Cache derives these from its layers; Fathom's state can be neither compiled nor rolled back
    is_compileable = False
    is_croppable = False

    def __init__(self):
        DecodeCache.__init__(self)
        Cache.__init__(self, layers=[])

    def get_seq_length(self, layer_idx=0):
        return self.length

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("a Fathom cache only grows: beam search, assisted decoding and cache cropping "
                                  "need generate(..., use_cache=False)")

    # Cache's versions loop over its (empty) layers: silently doing nothing would decode wrongly
    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = reset = _unsupported


class FathomForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FathomHFConfig
    _tied_weights_keys = {"lm_head.weight": "token_embedding.weight"}

    def __init__(self, config):
        super().__init__(config)
        transformer = Transformer(config.model_config())
        for name, module in transformer.named_children():
            self.add_module(name, module)
        # kept out of the module tree: its parameters are already this model's
        object.__setattr__(self, "transformer", transformer)
        self.post_init()

    def _init_weights(self, module):
        """Nothing to do: the Transformer's constructor initialized every weight by its method's rules
        (model/init.py), and from_pretrained then loads them all."""

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # generate() must not create a transformers DynamicCache: the first forward creates a FathomCache
        return False

    def get_input_embeddings(self):
        return self.token_embedding

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False, return_dict=True):
        """Logits for input_ids; with a cache, input_ids holds only the positions after those it has seen."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Fathom models have learned absolute positions and no padding mask: pass unpadded "
                             "sequences (a batch of equal lengths, or one sequence at a time)")
        if cache is None and use_cache:
            cache = FathomCache()
        elif cache is not None and not isinstance(cache, FathomCache):
            raise ValueError(f"a Fathom model decodes with its own FathomCache, not a {type(cache).__name__}")
        output = CausalLMOutputWithPast(logits=self.transformer(input_ids, cache), cache=cache)
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True, **kwargs):
        seen = cache.length if cache is not None else 0
        return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache}

