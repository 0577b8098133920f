# edgevlm: MobileVLM on Jetson Orin with TensorRT + Triton.  `make help` lists the targets.
#
# Build stages are file targets: each reruns only when what it is made from changed (the
# checkpoint, the exporter's code), so `make repo` or `make serve` after no change exports
# nothing. Every variable the targets read is declared here with its default.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny#            model shape for random-weight checkpoints (edgevlm/presets.py)
FORMAT ?= original#        random checkpoints' layout: original | llava-hf (LLaVA) | transformers5 (Llama-3.2-Vision)
MODEL ?=#                  a real MobileVLM, LLaVA or Llama-3.2-Vision checkpoint directory instead of a random one
NAME ?= $(if $(MODEL),$(notdir $(abspath $(MODEL))),$(PRESET)$(if $(filter llava-hf,$(FORMAT)),-hf)$(if $(filter transformers5,$(FORMAT)),-t5))#  artifact folder name
ART := artifacts/$(NAME)
CKPT := $(if $(MODEL),$(MODEL),$(ART)/checkpoint)
CLIP ?=#                   local openai CLIP directory: MobileVLM V1 (upstream's choice), LLaVA-1.5 (not in its checkpoint)
# A random LLaVA-1.5 checkpoint in the original layout has no tower either: its writer puts
# the stand-in for openai's CLIP beside it.
CLIP_DIR := $(or $(CLIP),$(if $(MODEL),,$(if $(and $(filter llava-v1.5-% tiny-llava-v1.5,$(PRESET)),$(filter original,$(FORMAT))),$(ART)/clip)))
TARGET ?= cpu#             repository target: cpu (ONNX Runtime) | jetson (TensorRT engines)
PRECISION ?=#              quantize: int8 (default) | int4;  engines: fp16 (default) | int8 | int4;
#                          repo/serve/demo on cpu: fp32 (default) | int8 | int4 (the quantized export's
#                          MatMulNBits decoder, made by `make quantize` when missing)
CALIB ?=#                  photo directory for INT8 calibration (default: scikit-image samples)
ENGINES ?=#                TensorRT engine directory for TARGET=jetson (default: this device's)
KV ?= auto#                KV cache layout: auto | static | concat
MAX_SEQUENCES ?= 8#        streams decoded together in one batched step
BATCHING ?= continuous#    continuous (MAX_SEQUENCES decoded together) | off (one at a time, for comparison)
KV_BUDGET_MIB ?= 0#        KV pool of the cpu target (0: MAX_SEQUENCES full contexts, <= RAM/4)
PREFIX_CACHE_MIB ?= 512#   earlier sequences' KV, reused by prompts that begin the same way (0: off)
IMAGE_CACHE_MIB ?= 64#     image embeddings by the image bytes' hash (0: off)
TEMPLATE ?=#               prompt template served instead of the export's (docs/CONTRACT.md: template)
MAX_CONTEXT ?=#            tokens a TensorRT decoder engine holds (default: the model's, at most 4096)
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
GATEWAY_PORT ?= 8080
TLS_CERT ?=
TLS_KEY ?=
TLS_CLIENT_CA ?=
PYTEST_ARGS ?=
BENCH_PRESETS ?= tiny mobilevlm-v2-1.7b
SOAK_REQUESTS ?= 1000#     make soak: requests per run (concurrency 8, tiny model)
SOAK_RUNS ?= 3#            make soak: runs in a row, all must be clean
CANCELS ?= inband#         make soak: how its clients cancel: inband (our cancel message) | grpc (raw tritonclient)
QUICK ?=#                  1: make bench as a smoke run
POWER_MODE ?=#             jetson-bench: switch to this nvpmodel mode by name first (root)
# On a Jetson the setup installs only what runs there (no torch, no exporters) into a venv
# that sees JetPack's system TensorRT; DEVICE=1 / DEVICE= overrides the detection.
DEVICE ?= $(if $(wildcard /etc/nv_tegra_release),1,)
SETUP := $(VENV)/.installed$(if $(DEVICE),-device,)

# What each stage is made from: its script and the package files it reads (tools/imports.py
# follows the imports), so editing a quantizer re-quantizes and re-exports nothing.
reads = $(1) $(shell $(PYTHON) tools/imports.py $(1))
CKPT_SRC := $(if $(MODEL),$(wildcard $(MODEL)/*),$(ART)/checkpoint/config.json)
EXPORT_SRC := $(call reads,build/export_onnx.py)
QUANT_SRC := $(call reads,build/quantize.py)
# The export an engine set is built from (build/build_engines.py export_for): int8 / int4 from
# their Q/DQ export, fp16 from onnx-fp16 (TensorRT 10 and 11; 8.x builds onnx/ with flags).
ENGINE_PRECISION := $(or $(PRECISION),fp16)
ENGINE_SRC := $(ART)/onnx/manifest.json $(ART)/onnx-$(ENGINE_PRECISION)/manifest.json
# The export a cpu repository serves: the FP32 one, or a quantized one (PRECISION=int8|int4)
SERVED := $(ART)/onnx$(if $(filter cpu,$(TARGET)),$(if $(filter int8 int4,$(PRECISION)),-$(PRECISION)),)

.PHONY: help setup checkpoint onnx verify quantize engines trt-api jetson-doctor jetson-bench repo serve gateway bench soak demo test test-fast clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(SETUP) ## create .venv with what the other targets need (idempotent; on a Jetson: no torch)

$(VENV)/.installed: pyproject.toml client/pyproject.toml
	@echo "== setup: $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the local CPU wheel; anything looser pulls multi-GB CUDA builds.
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[build,serve,test,bench]" -e "./client[images,gateway,watch]"
	@# Only the tritonserver binary, python backend and stubs of this wheel are used; its
	@# own pins (numpy, tritonclient) would fight ours, hence --no-deps.
	$(VENV)/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
	@# The web page's tests drive a real Chromium: Debian's, where apt-get can install it.
	@if command -v chromium >/dev/null; then echo "setup: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "setup: installing Debian's chromium for the web page tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "setup: apt-get could not install chromium: the web page tests will skip"; \
	else echo "setup: no chromium, and apt-get needs root: the web page tests will skip (apt-get install chromium)"; fi
	@touch $@

# The device venv sees JetPack's system packages (tensorrt, its cuda-python) and adds only
# the runtime, the engine builder's graph tools and the client: nothing that pulls torch.
$(VENV)/.installed-device: pyproject.toml client/pyproject.toml
	@echo "== setup (device: no torch): $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[engines]" -e "./client"
	@# cuda-python of this JetPack's CUDA: a newer one refuses its driver (edgevlm/jetson/stack.py)
	$(VENV)/bin/pip install -q "$$($(PY) -m edgevlm.jetson.stack --requirement)"
	@touch $@

checkpoint: $(CKPT_SRC) ## write a random-weight checkpoint for PRESET (upstream layout)

$(ART)/checkpoint/config.json: $(call reads,build/make_checkpoint.py) | $(SETUP)
	$(PY) build/make_checkpoint.py --preset $(PRESET) --layout $(FORMAT) --out $(ART)/checkpoint

onnx: $(ART)/onnx/manifest.json ## export vision_encoder.onnx + decoder.onnx + manifest (when the checkpoint or exporter changed)

ifeq ($(DEVICE),1)
$(ART)/onnx/manifest.json:  # exports need torch: they are made off the device and copied here
	@test -f $@ || { echo "onnx: no export at $(ART)/onnx: run \`make onnx\` on an x86 machine and copy artifacts/$(NAME)/onnx* here" >&2; exit 1; }
else
$(ART)/onnx/manifest.json: $(CKPT_SRC) $(EXPORT_SRC) | $(SETUP)
	$(PY) build/export_onnx.py --checkpoint $(CKPT) --out $(ART)/onnx $(if $(CLIP_DIR),--clip $(CLIP_DIR))
endif

verify: $(ART)/onnx/manifest.json ## PyTorch vs ONNX Runtime parity on real photos
	$(PY) build/verify.py --checkpoint $(CKPT) --onnx $(ART)/onnx $(if $(CLIP_DIR),--clip $(CLIP_DIR))

quantize: $(ART)/onnx-$(or $(PRECISION),int8)/manifest.json ## FP16 or Q/DQ export checked against FP32 (PRECISION=fp16|int8|int4, CALIB=photo dir)

ifeq ($(DEVICE),1)
$(ART)/onnx-%/manifest.json:  # like the export: made off the device and copied here
	@test -f $@ || { echo "engines: no export at $(ART)/onnx-$*: run \`make quantize PRECISION=$*\` on an x86 machine and copy artifacts/$(NAME)/onnx-$* here" >&2; exit 1; }
else
$(ART)/onnx-%/manifest.json: $(ART)/onnx/manifest.json $(QUANT_SRC) | $(SETUP)
	$(PY) build/quantize.py --onnx $(ART)/onnx --precision $* --out $(ART)/onnx-$* $(if $(CALIB),--calib-dir $(CALIB))
endif

# Off the device the script refuses at once, before anything is quantized for it.
engines: $(if $(DEVICE),$(ENGINE_SRC)) | $(SETUP) ## on the Orin: TensorRT engines (PRECISION=fp16|int8|int4, MAX_CONTEXT=, KV=auto|static|concat)
	$(PY) build/build_engines.py --onnx $(ART)/onnx --precision $(ENGINE_PRECISION) \
		$(if $(MAX_CONTEXT),--max-context $(MAX_CONTEXT)) --kv $(KV) --max-sequences $(MAX_SEQUENCES)

trt-api: | $(SETUP) ## our TensorRT code against the real Python API of 8.6, 10.3, 10.16, 11.4 (also in make test)
	$(PY) -m tools.trt_api

jetson-doctor: | $(SETUP) ## on the Orin: is it ready? JetPack, container runtime, TensorRT, cuda-python, memory, power mode
	$(PY) -m edgevlm.jetson.doctor --preset $(if $(filter tiny,$(PRESET)),mobilevlm-v2-1.7b,$(PRESET)) \
		--precision $(or $(PRECISION),fp16) $(if $(wildcard $(ART)/engines),--engines $(firstword $(wildcard $(ART)/engines/*-sm*)))

jetson-bench: | $(SETUP) ## on the Orin: encode/prefill/decode, J/token, peak memory vs the roofline (JSON)
	$(PY) tools/jetson_bench.py --onnx $(ART)/onnx $(if $(POWER_MODE),--power-mode $(POWER_MODE))

# Rendering is a second's copying, so it always runs (its options are variables); the export
# it reads is rebuilt only when out of date.
repo: $(SERVED)/manifest.json | $(SETUP) ## render the Triton model repository (TARGET=cpu|jetson; on cpu KV=auto|static|concat, PRECISION=fp32|int8|int4)
	@if [ "$(TARGET)" = cpu ] && [ -n "$(filter-out fp32 int8 int4,$(or $(PRECISION),fp32))" ]; then \
		echo "repo: the cpu target serves PRECISION=fp32|int8|int4, not $(PRECISION)" >&2; exit 2; fi
	$(PY) build/render_repository.py --onnx $(SERVED) --out $(ART)/repository --target $(TARGET) \
		$(if $(ENGINES),--engines $(ENGINES)) $(if $(filter cpu,$(TARGET)),--kv-cache $(KV)) \
		--max-sequences $(MAX_SEQUENCES) --batching $(BATCHING) --kv-budget-mib $(KV_BUDGET_MIB) \
		--prefix-cache-mib $(PREFIX_CACHE_MIB) --image-cache-mib $(IMAGE_CACHE_MIB) $(if $(TEMPLATE),--template $(TEMPLATE))

serve: repo ## run tritonserver on the repository (HOST=127.0.0.1, GRPC_PORT=8001, TLS_CERT/TLS_KEY; Ctrl-C stops)
	$(PY) -m edgevlm.serve --repository $(ART)/repository --host $(HOST) \
		--grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
		$(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(if $(TLS_CLIENT_CA),--tls-client-ca $(TLS_CLIENT_CA))

gateway: | $(SETUP) ## OpenAI-compatible HTTP gateway to a running server (GATEWAY_PORT=8080, loopback)
	$(VENV)/bin/edgevlm-client --url 127.0.0.1:$(GRPC_PORT) gateway --host $(HOST) --port $(GATEWAY_PORT)

bench: | $(SETUP) ## benchmarks, not in make test (BENCH_PRESETS="tiny mobilevlm-v2-1.7b", QUICK=1 smoke, ONLY=caches,... some sections): docs/bench/*.json + docs/BENCHMARKS.md
	@for p in $(BENCH_PRESETS); do for e in onnx onnx-int8 onnx-int4; do \
		$(MAKE) --no-print-directory artifacts/$$p/$$e/manifest.json PRESET=$$p NAME=$$p MODEL= || exit 1; done; done
	$(PY) tools/bench.py $(foreach p,$(BENCH_PRESETS),--onnx $(p)=artifacts/$(p)/onnx --checkpoint $(p)=artifacts/$(p)/checkpoint) \
		$(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY))

soak: | $(SETUP) ## long soak, not in make test: SOAK_RUNS x SOAK_REQUESTS requests at concurrency 8 on tiny, rude clients included
	@$(MAKE) --no-print-directory artifacts/tiny/onnx/manifest.json PRESET=tiny NAME=tiny MODEL=
	$(PY) tools/soak.py --onnx artifacts/tiny/onnx --requests $(SOAK_REQUESTS) --runs $(SOAK_RUNS) \
		--cancels $(CANCELS) --report docs/bench/soak.json

demo: repo ## the whole path: checkpoint, ONNX, repository, tritonserver, a streamed answer
	$(PY) tools/demo.py --repository $(ART)/repository $(if $(MODEL),,--random-weights)

test: setup ## the whole test suite (what CI runs)
	@# pytest exits 5 when it collected no test: that is a failure here, said plainly.
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup ## the unit tier only: no tritonserver, no device (a few minutes)
	$(PY) -m pytest -m unit $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests"; exit 1; fi; exit $$rc

clean: ## remove built artifacts (keeps .venv)
	rm -rf artifacts
