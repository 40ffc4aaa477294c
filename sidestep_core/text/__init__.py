"""Text side of ACE-Step conditioning: prompt templates and the Qwen3 text encoder + tokenizer."""
