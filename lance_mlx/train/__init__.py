"""LoRA fine-tuning: data (`data`), upstream's objective (`objective`), the loop (`loop`) and the command (`cli`)."""
