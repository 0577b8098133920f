# edgevlm: MobileVLM on Jetson Orin with TensorRT + Triton.  `make help` lists the targets.
#
#   PRESET=tiny           model shape for random-weight checkpoints (see edgevlm/presets.py)
#   MODEL=dir             a real MobileVLM checkpoint directory instead of a random one
#   NAME=...              artifact folder name (default: the preset, or the MODEL dir's name)
#   CLIP=dir              local openai CLIP directory for V1 checkpoints (upstream's choice)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
MODEL ?=
NAME ?= $(if $(MODEL),$(notdir $(abspath $(MODEL))),$(PRESET))
ART := artifacts/$(NAME)
CKPT := $(if $(MODEL),$(MODEL),$(ART)/checkpoint)
CLIP ?=
TARGET ?= cpu
PRECISION ?=
CALIB ?=
ENGINES ?=
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
GATEWAY_PORT ?= 8080
TLS_CERT ?=
TLS_KEY ?=
TLS_CLIENT_CA ?=
PYTEST_ARGS ?=

.PHONY: help setup checkpoint onnx verify quantize engines jetson-bench repo serve gateway bench demo test clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with everything the other targets need (idempotent)

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	@echo "== setup: $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the local CPU wheel; anything looser pulls multi-GB CUDA builds.
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[build,serve,test,bench]" -e "./client[images,gateway]"
	@# Only the tritonserver binary, python backend and stubs of this wheel are used; its
	@# own pins (numpy, tritonclient) would fight ours, hence --no-deps.
	$(VENV)/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
	@touch $@

checkpoint: setup ## write a random-weight checkpoint for PRESET (upstream layout)
	@if [ -n "$(MODEL)" ]; then echo "MODEL=$(MODEL) given: nothing to write"; \
	else $(PY) build/make_checkpoint.py --preset $(PRESET) --out $(ART)/checkpoint; fi

$(ART)/checkpoint/config.json:
	$(MAKE) --no-print-directory checkpoint PRESET=$(PRESET) NAME=$(NAME)

onnx: setup $(if $(MODEL),,$(ART)/checkpoint/config.json) ## export vision_encoder.onnx + decoder.onnx + manifest
	$(PY) build/export_onnx.py --checkpoint $(CKPT) --out $(ART)/onnx $(if $(CLIP),--clip $(CLIP))

$(ART)/onnx/manifest.json:
	$(MAKE) --no-print-directory onnx PRESET=$(PRESET) NAME=$(NAME) MODEL=$(MODEL) CLIP=$(CLIP)

verify: setup $(ART)/onnx/manifest.json ## PyTorch vs ONNX Runtime parity on real photos
	$(PY) build/verify.py --checkpoint $(CKPT) --onnx $(ART)/onnx $(if $(CLIP),--clip $(CLIP))

quantize: setup $(ART)/onnx/manifest.json ## Q/DQ export checked against FP32 (PRECISION=int8|int4, CALIB=photo dir)
	$(PY) build/quantize.py --onnx $(ART)/onnx --precision $(or $(PRECISION),int8) --out $(ART)/onnx-$(or $(PRECISION),int8) \
		$(if $(CALIB),--calib-dir $(CALIB))

MAX_CONTEXT ?=
engines: setup $(ART)/onnx/manifest.json ## on the Orin: TensorRT engines (PRECISION=fp16|int8|int4, MAX_CONTEXT=, KV=auto|static|concat)
	$(PY) build/build_engines.py --onnx $(ART)/onnx --precision $(or $(PRECISION),fp16) \
		$(if $(MAX_CONTEXT),--max-context $(MAX_CONTEXT)) $(if $(KV),--kv $(KV))

jetson-bench: setup ## on the Orin: encode/prefill/decode, J/token, peak memory vs the roofline (JSON)
	$(PY) build/jetson_bench.py --onnx $(ART)/onnx

repo: setup $(ART)/onnx/manifest.json ## render the Triton model repository (TARGET=cpu|jetson; on cpu KV=auto|static|concat)
	$(PY) build/render_repository.py --onnx $(ART)/onnx --out $(ART)/repository --target $(TARGET) \
		$(if $(ENGINES),--engines $(ENGINES)) $(if $(and $(KV),$(filter cpu,$(TARGET))),--kv-cache $(KV))

serve: repo ## run tritonserver on the repository (HOST=127.0.0.1, GRPC_PORT=8001, TLS_CERT/TLS_KEY; Ctrl-C stops)
	$(PY) -m edgevlm.serve --repository $(ART)/repository --host $(HOST) \
		--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
		$(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(if $(TLS_CLIENT_CA),--tls-client-ca $(TLS_CLIENT_CA))

gateway: setup ## OpenAI-compatible HTTP gateway to a running server (GATEWAY_PORT=8080, loopback)
	$(VENV)/bin/edgevlm-client --url 127.0.0.1:$(GRPC_PORT) gateway --host $(HOST) --port $(GATEWAY_PORT)

BENCH_PRESETS ?= tiny mobilevlm-v2-1.7b
QUICK ?=
bench: setup ## benchmarks, not in make test (BENCH_PRESETS="tiny mobilevlm-v2-1.7b", QUICK=1 smoke): JSON + docs/BENCHMARKS.md
	@for p in $(BENCH_PRESETS); do \
		$(MAKE) --no-print-directory artifacts/$$p/onnx/manifest.json PRESET=$$p NAME=$$p || exit 1; done
	$(PY) build/bench.py $(foreach p,$(BENCH_PRESETS),--onnx $(p)=artifacts/$(p)/onnx --checkpoint $(p)=artifacts/$(p)/checkpoint) \
		$(if $(QUICK),--quick)

demo: repo ## the whole path: checkpoint, ONNX, repository, tritonserver, a streamed answer
	$(PY) build/demo.py --repository $(ART)/repository $(if $(MODEL),,--random-weights)

test: setup ## the whole test suite (what CI runs)
	@# pytest exits 5 when it collected no test: that is a failure here, said plainly.
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

clean: ## remove built artifacts (keeps .venv)
	rm -rf artifacts
