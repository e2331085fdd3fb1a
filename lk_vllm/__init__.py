"""lk-vllm: LK-loss drafters for vLLM speculative decoding."""

__version__ = "0.1.0"
