"""The API-server side of the plugin: what runs in the process of vLLM's OpenAI server."""
