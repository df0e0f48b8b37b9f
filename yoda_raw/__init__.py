"""yoda_raw: QLoRA fine-tuning of Phi-3-mini into a Yoda-speak translator, every stage written out."""
