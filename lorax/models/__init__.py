"""Reference models that load Hugging Face checkpoints: GPT-2 and Llama in Flax linen
(``llama`` also loads Mistral, Qwen2 / Qwen2.5, Gemma and Gemma 2).

Transformers no longer ships Flax models, so lorax carries two compact ones::

    from lorax.models import gpt2, generate
    model, params = gpt2.from_pretrained("gpt2")          # or a local directory
    lp = lorax.wrap(params, rank=8, targets=["c_attn"])
    logits = lorax.lora(model.apply)({"params": lp}, input_ids)
    new_tokens = generate(model, lp, input_ids, 20)       # KV cache, jitted

Both keep Hugging Face's module names in their parameter paths and own one table between
those paths and the checkpoint's tensor names (``hf_table``), which loading, saving and the
PEFT interop all read. The core does not import this package: importing it registers the
PEFT families ``"gpt2"``, ``"llama"`` and Llama's relatives
(``lorax.export_peft(..., model="gpt2")``), and a
model instance gives its own map (``lorax.export_peft(..., model=model)``).
"""

from lorax.models import gpt2 as gpt2
from lorax.models import llama as llama
from lorax.models.generation import generate as generate
from lorax.models.layers import KVCache as KVCache
from lorax.models.prefix import init_prefix as init_prefix
from lorax.models.prefix import init_prompt as init_prompt
from lorax.models.prefix import prefix_cache as prefix_cache
