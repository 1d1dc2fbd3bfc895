"""mmd_jax: multistep distillation of diffusion models by moment matching, in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="mmd_jax",
    version="0.1.0",
    description="Multistep distillation of diffusion models via moment matching (JAX/Flax).",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mmd_jax", "mmd_jax.*"]),
    install_requires=REQUIREMENTS,
    extras_require={
        # libtpu (through jax[tpu]) lets the tests compile ahead of time for a TPU topology on CPU.
        # nbclient + ipykernel execute experiments/colab/evaluate.ipynb headless in the tests.
        "test": ["pytest>=9.0.3", "jax[tpu]>=0.10.2", "nbclient>=0.11.0", "nbformat>=5.11.1",
                 "ipykernel>=7.4.0"],
        # Pod slices, and ahead-of-time compilation for TPU topologies on a CPU machine.
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        # Only for preparing TFDS catalogue data sets (cifar10, imagenet_resized) on a machine
        # with network; reading them never needs TensorFlow.
        "prepare": ["tensorflow>=2.20"],
        # The PyTorch peer of experiments/bench_train_step.py.
        "bench": ["torch==2.13.0", "diffusers>=0.35"],
        # Parity of the Flax FID Inception with pytorch-fid (separate venv: torch versions differ
        # from `bench`); also what experiments/convert_inception_weights.py needs.
        "parity": ["torch==2.14.1", "torchvision==0.29.1", "pytorch-fid>=0.3.0"],
    },
)
