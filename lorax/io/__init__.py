"""Reading and writing adapters: lorax's own checkpoints (``checkpoint``) and the Hugging
Face PEFT directory format (``peft``)."""
