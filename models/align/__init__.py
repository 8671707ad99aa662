"""Post-training maths: SFT data packing (sft.py), LoRA (lora.py); reward/DPO/distillation losses beside them."""
