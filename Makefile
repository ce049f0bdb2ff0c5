# Targets mirror the README's commands. `make help` lists them.
SHELL := /bin/bash

# The services the integration tests talk to (started by .ci/run when down).
export BRANCHKEY_TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export BRANCHKEY_TEST_RABBITMQ_ADMIN_URL ?= http://guest:guest@127.0.0.1:15672
export BRANCHKEY_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test?sslmode=disable
export BRANCHKEY_TEST_PYTHON ?= /usr/bin/python3

STATICCHECK := go run honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: help demo build test test-disruptive lint bench fuzz

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

demo: ## run the demo on the embedded defaults (the README's first command)
	go run ./cmd/branchkey demo

build: ## build bin/branchkey
	go build -o bin/branchkey ./cmd/branchkey

test: ## all tests with -race, RabbitMQ, PostgreSQL and Python interop included, then the disruptive ones
	go test -race -count=1 ./...
	$(MAKE) test-disruptive

test-disruptive: ## tests that restart RabbitMQ or PostgreSQL, one package at a time
	BRANCHKEY_TEST_DISRUPTIVE=1 go test -race -count=1 -p 1 -run Disruptive ./...

lint: ## gofmt, go vet and staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	go vet ./...
	$(STATICCHECK) ./...

bench: ## the benchmarks against their Python peers (several minutes, GBs of temp files)
	bash bench/decode.sh
	bash bench/aggregate.sh
	bash bench/upload.sh

fuzz: ## fuzz the weights decoder for 10 minutes
	go test -run '^$$' -fuzz FuzzDecode -fuzztime 10m ./weights/
