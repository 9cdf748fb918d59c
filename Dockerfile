# Minimal image for the model package (the deploy issue adds the API/worker stages,
# CUDA variant and healthcheck). Build: docker build -t lpd .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY model/ model/
COPY benchmarks/ benchmarks/

RUN useradd --create-home --uid 10001 lpd
USER lpd

CMD ["python", "-m", "model.summary", "--preset", "official-256"]
