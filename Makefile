# comfyui-dreammatcher developer commands. Everything installs itself on first use.
#   make test     set up the pinned host (first run: a few minutes) and run every test tier
#   make test-compat  set up a second environment for the newest host in ../shared/hosts/ (or
#                 COMFYUI_TARBALL / COMFYUI_PATH) and run the host, e2e and browser tiers on it
#   make serve    start the embedded ComfyUI with this pack on http://127.0.0.1:8188
#   make run CKPT=model.safetensors REF=photo.png PROMPT="..." SUBJECT="..." [LORA=f[:w] EMBEDDINGS=
#                 STEPS= SEED= BATCH= SIZE= REF_PROMPT= OUT=]  the full method and its baseline headless, with the inspectors
#                 (without CKPT: the miniature world's shipped model, a reference rendered from REF_PROMPT
#                 and PROMPT in its words; it prints what each image shows)
#   make bench    AMA / bank / batch / guidance cost vs plain ComfyUI sampling (ratios; writes
#                 benchmarks/out/bench.json)
#   make profile  where an AMA sampling spends its time (cProfile, per stage)
#   make syncs    host reads (GPU synchronisations) per sampling step, by call site (benchmarks/out/host_reads.json)
#   make bench-core  matching kernels vs a naive implementation
#   make demo     ComfyUI with the pack and the miniature world's demo nodes; opens the demo workflow
#   make fidelity a miniature Table 5 on the miniature world's model (FIDELITY_ARGS="--cases FILE --out DIR")
#   make train-miniworld  train a model of the miniature world (the shipped recipe: 1,850 steps or 75 min; CUDA if present);
#                 writes weights/miniworld-trained.safetensors beside the shipped model
#   make gpu-check   GPU parity, timing and peak VRAM (on a CUDA machine; writes $OUT or ./gpu-out)
# COMFYUI_PATH=/path/to/ComfyUI make test|serve  uses another ComfyUI checkout.

PY := .venv/bin/python
PORT ?= 8188
SERVE_BASE ?= $(CURDIR)/.host/serve

.PHONY: setup test test-compat lint serve run bench bench-core profile syncs gpu-check clean demo fidelity \
	train-miniworld

setup:
	@bash scripts/setup_host.sh

lint: setup
	$(PY) -m ruff check .

test: setup
	@bash scripts/setup_tools.sh
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q -ra --durations=20

COMPAT_TIERS ?= tests/host tests/e2e tests/browser

test-compat: setup
	@root="$$(bash scripts/setup_compat.sh)" && echo "[compat] ComfyUI at $$root" && \
	  COMFYUI_PATH="$$root" .venv-compat/bin/python -m pytest $(COMPAT_TIERS) -q -ra --durations=20

serve: setup
	@bash scripts/serve.sh $(PORT) "$(SERVE_BASE)"

run: setup
	@$(PY) scripts/run_example.py --ckpt "$(CKPT)" --ref "$(REF)" --prompt "$(PROMPT)" --subject "$(SUBJECT)" \
	  --ref-prompt "$(REF_PROMPT)" --lora "$(LORA)" --embeddings "$(EMBEDDINGS)" --steps "$(STEPS)" \
	  --seed "$(SEED)" --batch "$(BATCH)" \
	  --size "$(SIZE)" --out "$(OUT)"

bench: setup
	$(PY) benchmarks/bench_sampling.py

bench-core: setup
	$(PY) benchmarks/bench_core.py

profile: setup
	$(PY) benchmarks/profile_ama.py $(PROFILE_ARGS)

syncs: setup
	$(PY) benchmarks/host_reads.py $(SYNCS_ARGS)

demo: setup
	@bash scripts/demo.sh $(PORT)

fidelity: setup
	$(PY) benchmarks/fidelity.py $(FIDELITY_ARGS)

train-miniworld: setup
	$(PY) scripts/train_miniworld.py $(TRAIN_ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .venv .venv-compat .venv-tools .host
