"""The PEFT methods: each module holds one leaf kind and the function that builds it.

``lora`` (LoRA, DoRA's base, rsLoRA; ``wrap``), ``lora_init`` (PiSSA / OLoRA / LoftQ),
``dora``, ``ia3``, ``adapters`` (bottleneck adapters), ``unfrozen`` (BitFit, modules to
save), ``multi`` (many adapters served at once) and ``weighted`` (adapter merging).
"""
