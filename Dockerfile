# syntax=docker/dockerfile:1
# The modelcache image for people with Docker/BuildKit: `docker build -t modelcache:0.1.0 .`
# Same shape as the offline build (`make image`, scripts/build_image.py, which CI tests): Debian
# bookworm + python3, a venv at /opt/modelcache, user 65532 with a passwd entry (kopf calls
# getpwuid), HOME=/tmp so the root filesystem can be read-only. Layers: OS, dependencies (change
# only with pyproject.toml), our wheel last, so a code change rebuilds in seconds.
# One image for every component: `modelcache controller|webhook|agent|initialize`.

FROM debian:bookworm-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && echo "nonroot:x:65532:65532:modelcache:/home/nonroot:/usr/sbin/nologin" >> /etc/passwd \
 && echo "nonroot:x:65532:" >> /etc/group \
 && mkdir -p /home/nonroot && chown 65532:65532 /home/nonroot && chmod 750 /home/nonroot

FROM base AS wheel
RUN python3 -m venv /build && /build/bin/pip install --no-cache-dir "hatchling>=1.21"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /build/bin/pip wheel --no-deps --no-build-isolation -w /wheels .

FROM base AS deps
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -m venv /opt/modelcache \
 && /opt/modelcache/bin/pip install --no-cache-dir $(python3 -c "import tomllib; \
print(' '.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))") \
 && rm /tmp/pyproject.toml

FROM base
COPY --from=deps /opt/modelcache /opt/modelcache
RUN --mount=from=wheel,source=/wheels,target=/wheels \
    /opt/modelcache/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
 && /opt/modelcache/bin/pip uninstall -q -y pip setuptools \
 && /opt/modelcache/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/modelcache/lib
ENV PATH=/opt/modelcache/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["modelcache"]
CMD ["--help"]
