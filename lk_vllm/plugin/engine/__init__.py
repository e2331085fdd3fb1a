"""The engine-core side of the plugin: what runs in vLLM's EngineCore (and worker) process."""
