# One image for every process type; the Procfile line to run is the container's command:
#   docker run IMAGE web|worker|beat|flower|release
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN mkdir api shared worker emulator \
    && touch api/__init__.py shared/__init__.py worker/__init__.py emulator/__init__.py \
    && pip install -e .

COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /app refunds
USER refunds

ENV PORT=8000
EXPOSE 8000
ENTRYPOINT ["python", "-m", "cli.procfile"]
CMD ["web"]
