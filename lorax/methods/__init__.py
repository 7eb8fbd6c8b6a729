"""The PEFT methods: each module holds one leaf kind and the function that builds it.

``lora`` (the LoRA leaf), ``wrap`` (``lorax.wrap``: LoRA, rsLoRA and DoRA leaves),
``lora_init`` (PiSSA / OLoRA / LoftQ initialisations), ``dora``, ``ia3``, ``oft``
(orthogonal fine-tuning), ``adapters`` (bottleneck adapters), ``unfrozen`` (BitFit, modules
to save), ``multi`` (many adapters served at once), ``weighted`` (adapter merging),
``merging`` (its TIES / DARE task arithmetic) and ``named`` (``lorax.AdapterSet``: named
adapters over one base).
"""
