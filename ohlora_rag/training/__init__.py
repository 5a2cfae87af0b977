"""Training: S-BERT fine-tuning (sbert.py) and LoRA SFT of the LLM (llm.py)."""
