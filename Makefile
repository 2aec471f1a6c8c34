# ds4 -- build the engine, the converter and the tiny test model; run the tests.
#
#   make          ./ds4, ./ds4-convert, vectors/tiny.gguf + vectors/tiny-mtp.gguf
#   make test     every test; the last line says "N passed, N failed"
#   make cuda     ./ds4 with the NVIDIA backend (needs nvcc); make test-cuda on that box
#   make test-arm64  the quant tests cross-built for arm64, run under qemu-aarch64
#                    (make test-arm64-model adds the tiny model: slow)
#   make bench    figures for the tiny model (see README for the full-width one)
#   make fuzz     the request fuzzer for minutes (FUZZ_ROUNDS, FUZZ_SEED)
#   make book     regenerate book/ (ds4.c as HTML); make book-check lints ds4.c
#
# Dependencies: a C compiler, libc, pthreads, SQLite 3 (the disk KV index).

CC      ?= cc
CFLAGS  ?= -O2 -g
WARN    := -Wall -Wextra -Wno-unused-function -D_GNU_SOURCE
LIBS    := -lm -lpthread -lsqlite3
SAN     := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# x86-64 builds for the machine they run on (AVX2/FMA/F16C kernels);
# arm64 always has NEON.
ifeq ($(shell uname -m),x86_64)
ARCH    ?= -march=native
endif

SOURCES := ds4.c

# macOS: the Metal backend (ds4_metal.m + kernels.metal, ds4.c 8.14) is built
# in and is the default; Linux builds ignore it.
ifeq ($(shell uname -s),Darwin)
GPU_OBJ   := ds4_metal.o
GPU_FLAGS := -DDS4_GPU
GPU_LIBS  := -framework Metal -framework Foundation
CXX_LIB   := -lc++
else
CXX_LIB   := -lstdc++
endif

all: ds4 ds4-convert vectors/tiny.gguf

ds4: $(SOURCES) $(GPU_OBJ)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) $(GPU_FLAGS) -o $@ ds4.c $(GPU_OBJ) $(LIBS) $(GPU_LIBS)

ds4_metal.o: ds4_metal.m
	$(CC) $(CFLAGS) -fobjc-arc -DDS4_KERNELS_PATH='"$(CURDIR)/kernels.metal"' -c -o $@ ds4_metal.m

ds4-convert: tools/ds4_convert.c $(SOURCES)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ tools/ds4_convert.c $(LIBS)

# The tiny model ships as an official-format checkpoint; the GGUFs are built.
TINY_SRC := vectors/tiny/config.json vectors/tiny/model.safetensors.index.json vectors/tiny-vocab.gguf
vectors/tiny.gguf: ds4-convert $(TINY_SRC)
	./ds4-convert vectors/tiny vectors/tiny.gguf --mtp vectors/tiny-mtp.gguf --type f16 --vocab vectors/tiny-vocab.gguf
vectors/tiny-mtp.gguf: vectors/tiny.gguf

# ---------------------------------------------------------------- tests

TESTBIN := tests/bin
TEST_PROGRAMS := $(TESTBIN)/test_quant $(TESTBIN)/test_json $(TESTBIN)/test_gguf \
                 $(TESTBIN)/test_convert $(TESTBIN)/test_text $(TESTBIN)/test_model \
                 $(TESTBIN)/test_spec $(TESTBIN)/test_kvdisk $(TESTBIN)/kvdisk \
                 $(TESTBIN)/test_metal $(TESTBIN)/test_metal_model $(TESTBIN)/test_backend \
                 $(TESTBIN)/fuzz_http $(TESTBIN)/test_cuda $(TESTBIN)/test_cuda_model

$(TESTBIN):
	mkdir -p $@

$(TESTBIN)/test_quant: tests/test_quant.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_model: tests/test_model.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_spec: tests/test_spec.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_backend: tests/test_backend.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_kvdisk: tests/test_kvdisk.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

# The Metal-on-CPU harness: kernels.metal compiled unchanged as C++14 (MSL's base; clang++,
# whose ext_vector_type gives MSL's vectors) against tests/metal/include/.
METAL_CXX ?= clang++
$(TESTBIN)/metal_harness.o: tests/metal/harness.cpp kernels.metal tests/metal/include/metal_stdlib | $(TESTBIN)
	$(METAL_CXX) -std=c++14 -O2 -g -Wall -Wno-unknown-attributes -I tests/metal/include -c -o $@ $<

$(TESTBIN)/test_metal: tests/test_metal.c tests/harness.h $(TESTBIN)/metal_harness.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -Wno-aggressive-loop-optimizations -o $@ $< $(TESTBIN)/metal_harness.o $(CXX_LIB) $(LIBS)

# The whole tiny model through the GPU backend (ds4.c 8.14) on the harness.
$(TESTBIN)/test_metal_model: tests/test_metal_model.c tests/harness.h tests/forward_runs.h $(TESTBIN)/metal_harness.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(TESTBIN)/metal_harness.o $(CXX_LIB) $(LIBS)

# On a Mac: the same kernel checks on the real GPU (ds4_metal.m implements the
# gpu_* dispatches the harness emulates). Prints "N passed, N failed".
$(TESTBIN)/test_metal_gpu: tests/test_metal.c tests/harness.h ds4_metal.m kernels.metal $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(WARN) -DDS4_METAL_GPU -fobjc-arc -o $@ $< ds4_metal.m -framework Metal -framework Foundation $(LIBS)

test-metal: all $(TESTBIN)/test_metal_gpu
	@$(TESTBIN)/test_metal_gpu > $(TESTBIN)/test-metal.log; k=$$?; cat $(TESTBIN)/test-metal.log; \
	 ./ds4 --backend metal --check-vectors vectors/vectors.json -m vectors/tiny.gguf \
	   --mtp vectors/tiny-mtp.gguf > $(TESTBIN)/vectors-metal.log; v=$$?; cat $(TESTBIN)/vectors-metal.log; \
	 kp=$$(tail -n 1 $(TESTBIN)/test-metal.log | sed -n 's/^\([0-9]*\) passed.*/\1/p'); \
	 kf=$$(tail -n 1 $(TESTBIN)/test-metal.log | sed -n 's/.* \([0-9]*\) failed.*/\1/p'); \
	 vp=$$(tail -n 1 $(TESTBIN)/vectors-metal.log | sed -n 's/^\([0-9]*\) passed.*/\1/p'); \
	 vf=$$(tail -n 1 $(TESTBIN)/vectors-metal.log | sed -n 's/.* \([0-9]*\) failed.*/\1/p'); \
	 echo; echo "$$(( $${kp:-0} + $${vp:-0} )) passed, $$(( $${kf:-1} + $${vf:-1} )) failed"; \
	 [ $$k -eq 0 ] && [ $$v -eq 0 ]

# ---- CUDA (ds4_cuda.cu) ----
# Under make test: ds4_cuda.cu, kernels and host code, compiled unchanged as C++
# against the CUDA-on-CPU prelude (tests/cuda/include/, on the Metal harness's
# fibers), linked into the same kernel checks and model test as Metal.
$(TESTBIN)/cuda_emulated.o: ds4_cuda.cu tests/cuda/include/cuda_emulation.h tests/metal/include/metal_stdlib | $(TESTBIN)
	$(METAL_CXX) -std=c++14 -O2 -g -Wall -x c++ -DDS4_CUDA_EMULATION -I tests/cuda/include -c -o $@ ds4_cuda.cu

$(TESTBIN)/test_cuda: tests/test_metal.c tests/harness.h $(TESTBIN)/cuda_emulated.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -Wno-aggressive-loop-optimizations -o $@ $< $(TESTBIN)/cuda_emulated.o $(CXX_LIB) $(LIBS)

$(TESTBIN)/test_cuda_model: tests/test_metal_model.c tests/harness.h tests/forward_runs.h $(TESTBIN)/cuda_emulated.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -DDS4_GPU_NAME='"cuda"' -o $@ $< $(TESTBIN)/cuda_emulated.o $(CXX_LIB) $(LIBS)

# On an NVIDIA machine with the toolkit (nvcc on PATH): make cuda builds ./ds4
# with --backend cuda (the default stays cpu); make test-cuda runs the kernel
# checks on the GPU and the oracle vectors through --backend cuda, with and
# without MTP, and prints "N passed, N failed". Written for sm_90 (H200).
# make cuda REPLACES ./ds4; plain make does not rebuild it afterwards (rm ds4).
NVCC       ?= nvcc
CUDA_ARCH  ?= sm_90
CUDA_HOME  ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))
CUDA_LIBS  := -L$(CUDA_HOME)/lib64 -lcudart -lstdc++

ds4_cuda.o: ds4_cuda.cu
	@command -v $(NVCC) >/dev/null || { echo "make cuda: nvcc not found (install the CUDA toolkit)"; exit 1; }
	$(NVCC) -O2 -std=c++14 -arch=$(CUDA_ARCH) -Xcompiler -Wall -c -o $@ ds4_cuda.cu

cuda: ds4_cuda.o ds4-convert vectors/tiny.gguf
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -DDS4_GPU -DDS4_GPU_NAME='"cuda"' -o ds4 ds4.c ds4_cuda.o $(LIBS) $(CUDA_LIBS)

$(TESTBIN)/test_cuda_gpu: tests/test_metal.c tests/harness.h ds4_cuda.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -Wno-aggressive-loop-optimizations -DDS4_CUDA_GPU -o $@ $< ds4_cuda.o $(LIBS) $(CUDA_LIBS)

# The CUDA backend against the CPU on a full-width model (tests/cuda/device.sh
# makes one with ds4-convert --synthetic full and runs it).
$(TESTBIN)/test_cuda_full: tests/test_cuda_full.c tests/harness.h tests/forward_runs.h ds4_cuda.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -DDS4_GPU_NAME='"cuda"' -o $@ $< ds4_cuda.o $(LIBS) $(CUDA_LIBS)

# The NEON kernels (ds4.c 3.9, 16.1) on an x86 machine: tests/test_quant.c built with
# aarch64-linux-gnu-gcc and run under qemu-aarch64 on CPU models with and without sdot.
test-arm64:
	@sh tests/arm64.sh

# The same, plus tests/test_model.c on the tiny models under qemu (slow: about 12 minutes).
test-arm64-model: vectors/tiny.gguf $(TEST_MODELS)
	@sh tests/arm64.sh --model

test-cuda: cuda $(TESTBIN)/test_cuda_gpu $(TESTBIN)/test_cuda_full
	@sh tests/cuda/device.sh

$(TESTBIN)/kvdisk: tests/kvdisk_driver.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

# Everything that parses untrusted bytes runs under the sanitizers.
$(TESTBIN)/test_json: tests/test_json.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/fuzz_http: tests/fuzz_http.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_gguf: tests/test_gguf.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_text: tests/test_text.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_convert: tests/test_convert.c tests/harness.h tools/ds4_convert.c $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/tiny-q8_0.gguf: ds4-convert $(TINY_SRC) | $(TESTBIN)
	./ds4-convert vectors/tiny $@ --type q8_0
$(TESTBIN)/tiny-q2.gguf: ds4-convert $(TINY_SRC) | $(TESTBIN)
	./ds4-convert vectors/tiny $@ --type q2
$(TESTBIN)/tiny-q4.gguf: ds4-convert $(TINY_SRC) | $(TESTBIN)
	./ds4-convert vectors/tiny $@ --type q4

TEST_MODELS := $(TESTBIN)/tiny-q8_0.gguf $(TESTBIN)/tiny-q2.gguf $(TESTBIN)/tiny-q4.gguf

# The server suite drives ./ds4 --server with the real OpenAI and Anthropic
# client libraries (npm packages pinned in tests/server/package-lock.json).
tests/server/node_modules: tests/server/package-lock.json
	@if command -v npm >/dev/null; then cd tests/server && npm ci --no-audit --no-fund --loglevel=error; \
	 else echo "npm not found: the server SDK tests will be reported as failed"; fi

test: all $(TEST_PROGRAMS) $(TEST_MODELS) tests/server/node_modules
	@sh tests/run.sh

# The fuzzer of tests/fuzz_http.c, far longer than make test's 20000 rounds.
FUZZ_ROUNDS ?= 500000
FUZZ_SEED ?= $(shell date +%s)
fuzz: $(TESTBIN)/fuzz_http
	$(TESTBIN)/fuzz_http $(FUZZ_ROUNDS) $(FUZZ_SEED)

# The four coding agents (Claude Code, Codex, opencode, Pi) from npm, each
# running a turn and a tool loop against ./ds4 --server (tests/agents/run.sh).
# Not part of `make test`: it downloads the agents. DS4_AGENTS_PREFIX=DIR
# reuses an earlier install.
test-agents: all
	@sh tests/agents/run.sh

bench: all
	./ds4 --bench -m vectors/tiny.gguf --bench-prefill 256 --bench-decode 64

# ---------------------------------------------------------------- the book

# ds4.c rendered as a book (tools/book.py, Python 3 standard library only).
# book/ is committed; tests/book_sync.sh fails when it is stale.
BOOK_DIR ?= book
BOOK_SRC := ds4.c tools/ds4_convert.c vectors/README.md docs/gguf-layout.md docs/forward.md docs/server-api.md docs/vectors.md

book:
	rm -f $(BOOK_DIR)/*.html
	python3 tools/book.py --out $(BOOK_DIR) $(BOOK_SRC)

book-check:
	python3 tools/book.py --check ds4.c

clean:
	rm -rf ds4 ds4-convert ds4_metal.o ds4_cuda.o $(TESTBIN) vectors/tiny.gguf vectors/tiny-mtp.gguf

.PHONY: all test test-metal test-arm64 test-arm64-model cuda test-cuda test-agents bench fuzz clean book book-check
