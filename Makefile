# ds4 -- build the engine, the converter and the tiny test model; run the tests.
#
#   make          ./ds4, ./ds4-convert, vectors/tiny.gguf + vectors/tiny-mtp.gguf
#   make test     every test; the last line says "N passed, N failed"
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
                 $(TESTBIN)/fuzz_http

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

$(TESTBIN)/test_metal: tests/test_metal.c $(TESTBIN)/metal_harness.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -Wno-aggressive-loop-optimizations -o $@ $< $(TESTBIN)/metal_harness.o $(CXX_LIB) $(LIBS)

# The whole tiny model through the GPU backend (ds4.c 8.14) on the harness.
$(TESTBIN)/test_metal_model: tests/test_metal_model.c $(TESTBIN)/metal_harness.o $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(TESTBIN)/metal_harness.o $(CXX_LIB) $(LIBS)

# On a Mac: the same kernel checks on the real GPU (ds4_metal.m implements the
# gpu_* dispatches the harness emulates). Prints "N passed, N failed".
$(TESTBIN)/test_metal_gpu: tests/test_metal.c ds4_metal.m kernels.metal $(SOURCES) | $(TESTBIN)
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

$(TESTBIN)/kvdisk: tests/kvdisk_driver.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

# Everything that parses untrusted bytes runs under the sanitizers.
$(TESTBIN)/test_json: tests/test_json.c tests/harness.h $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/fuzz_http: tests/fuzz_http.c $(SOURCES) | $(TESTBIN)
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
	python3 tools/book.py --out $(BOOK_DIR) $(BOOK_SRC)

book-check:
	python3 tools/book.py --check ds4.c

clean:
	rm -rf ds4 ds4-convert ds4_metal.o $(TESTBIN) vectors/tiny.gguf vectors/tiny-mtp.gguf

.PHONY: all test test-metal test-agents bench fuzz clean book book-check
