"""Reading and writing adapters: lorax's own checkpoints (``checkpoint``), named adapters
(``named``: ``lorax.save_adapters`` / ``lorax.load_adapters``) and the Hugging Face PEFT
directory format (``peft``)."""
