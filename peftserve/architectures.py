"""The model families whose serving is measured against PEFT, adapter type by adapter type.

``tools/support_matrix.py`` builds a tiny model of each family listed here and checks every adapter type
against PEFT (docs/models.md, "Supported architectures"); validation tells users whether their base is one of them.
"""

from __future__ import annotations

# transformers ``model_type`` -> the family name shown in the table of docs/models.md.
TESTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral (MoE)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3",
    "gpt2": "GPT-2 (Conv1D)",
    "gpt_neox": "GPT-NeoX",
    "gptj": "GPT-J",
    "opt": "OPT",
    "falcon": "Falcon",
    "bloom": "Bloom",
    "starcoder2": "StarCoder2",
    "gpt_bigcode": "GPT-BigCode (StarCoder 1)",
    "phi": "Phi-1 / Phi-2",
    "olmo2": "OLMo 2",
    "granite": "Granite",
    "cohere": "Cohere (Command R)",
    "stablelm": "StableLM",
    "phimoe": "Phi-3.5-MoE",
    "deepseek_v3": "DeepSeek-V3 (MLA, MoE)",
    "gpt_oss": "GPT-OSS (MoE)",
}
