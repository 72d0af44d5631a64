# fastproxy container image.
#
#   docker build -t fastproxy .
#   docker run --rm -p 8000:8000 fastproxy                              # live Bybit, one node
#   docker run --rm -p 8000:8000 fastproxy --demo                       # offline, the simulator
#   docker run --rm -p 8000:8000 --env-file .env fastproxy              # settings from .env
#
# Every setting is an environment variable (.env.example lists them all with their defaults);
# arguments after the image name are fastproxy's flags. The process runs as an unprivileged
# user, stops gracefully on SIGTERM (clients get 1001) and re-reads API_KEYS_FILE on SIGHUP
# (`docker kill -s HUP NAME`). The health check asks /ready on $PORT (https when TLS_CERT is set).

# Build stage: compile the Cython codec into a wheel (the dashboard page ships inside it).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ext
COPY fastproxy fastproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run stage: no compiler, just the wheels (runtime dependencies only, no test tools).
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 fastproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER fastproxy
ENV HOST=0.0.0.0 PORT=8000 LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s CMD ["python", "-m", "fastproxy.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastproxy"]
