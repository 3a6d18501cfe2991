# CPU image: installs bros-hf and runs the default recipe (offline: local corpus, model from config).
# On GPUs start from a CUDA base instead, e.g.
#   FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
# and drop the CPU torch line (the image's CUDA build of torch is used).
FROM python:3.11-slim

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY pyproject.toml README.md ./
COPY bros_hf ./bros_hf
COPY recipes ./recipes
RUN pip install -e ".[recipes]"

CMD ["python", "recipes/lm_data_mixture.py", "--output_dir", "/app/outputs/lm_data_mixture"]
