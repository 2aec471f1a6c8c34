# ds4 -- build the engine, the converter and the tiny test model; run the tests.
#
#   make          ./ds4, ./ds4-convert, vectors/tiny.gguf + vectors/tiny-mtp.gguf
#   make test     every test; the last line says "N passed, N failed"
#   make bench    figures for the tiny model (see README for the full-width one)
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

all: ds4 ds4-convert vectors/tiny.gguf

ds4: $(SOURCES)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ ds4.c $(LIBS)

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
                 $(TESTBIN)/test_spec $(TESTBIN)/test_kvdisk $(TESTBIN)/kvdisk

$(TESTBIN):
	mkdir -p $@

$(TESTBIN)/test_quant: tests/test_quant.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_model: tests/test_model.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_spec: tests/test_spec.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_kvdisk: tests/test_kvdisk.c $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/kvdisk: tests/kvdisk_driver.c $(SOURCES) | $(TESTBIN)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) -o $@ $< $(LIBS)

# Everything that parses untrusted bytes runs under the sanitizers.
$(TESTBIN)/test_json: tests/test_json.c $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_gguf: tests/test_gguf.c $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_text: tests/test_text.c $(SOURCES) | $(TESTBIN)
	$(CC) $(SAN) $(WARN) -o $@ $< $(LIBS)

$(TESTBIN)/test_convert: tests/test_convert.c tools/ds4_convert.c $(SOURCES) | $(TESTBIN)
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
BOOK_SRC := ds4.c tools/ds4_convert.c vectors/README.md

book:
	python3 tools/book.py --out $(BOOK_DIR) $(BOOK_SRC)

book-check:
	python3 tools/book.py --check ds4.c

clean:
	rm -rf ds4 ds4-convert $(TESTBIN) vectors/tiny.gguf vectors/tiny-mtp.gguf

.PHONY: test-agents all test bench clean book book-check
