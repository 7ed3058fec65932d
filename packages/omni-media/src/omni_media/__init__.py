"""omni-media: turning images and audio into embeddings a language model reads.

Below omni-model in the import order (it imports torch, numpy, safetensors and Pillow only)."""
