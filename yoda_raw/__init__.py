"""yoda_raw: QLoRA fine-tuning of Phi-3-mini into a Yoda-speak translator, every stage written out."""

from yoda_raw import quiet  # noqa: F401 - first: the libraries' noise that is not about the user's run
