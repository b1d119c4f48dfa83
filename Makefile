# banger: build, install and test.
#
#   make install     build release binaries and install them (PREFIX=/usr/local)
#   make test        install the host packages the tests need, then run the whole suite
#   make uninstall   stop the daemon and remove what `make install` put in place

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man/man1
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
DOCDIR ?= $(PREFIX)/share/doc/banger
CARGO  ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
# The agent runs inside guests of any userland, so it is linked statically.
AGENT_RUSTFLAGS := -C target-feature=+crt-static

# Host packages: runtime needs (qemu, nft, e2fsprogs, ssh, debootstrap; gpgv and Debian's keyring
# to verify the generic kernel's package) and test-only tools (a real OCI registry, umoci and
# skopeo to make and push test images, busybox for tiny guests, tmux to drive terminals).
APT_RUNTIME := debootstrap qemu-system-x86 nftables e2fsprogs openssh-client zstd iproute2 sudo ca-certificates git \
               gpgv debian-archive-keyring
APT_TEST    := openssh-server dnsutils dnsmasq-base procps util-linux libc6-dev \
               docker-registry umoci skopeo busybox-static cpio apache2-utils whois tmux openssl python3
# Benchmarks only (`make bench-deps`): the DNS load generator.
APT_BENCH   := dnsperf

.PHONY: all build agent install uninstall test deps test-deps bench-deps fmt lint bench

all: build

build:
	$(CARGO) build --release --workspace --bins
	$(MAKE) agent PROFILE=release

agent:
	RUSTFLAGS="$(AGENT_RUSTFLAGS)" $(CARGO) build $(if $(filter release,$(PROFILE)),--release) \
		-p banger-agent --target $(AGENT_TARGET) --target-dir target/agent

deps:
	@./scripts/apt-ensure $(APT_RUNTIME)

test-deps:
	@./scripts/apt-ensure $(APT_RUNTIME) $(APT_TEST)

bench-deps:
	@./scripts/apt-ensure $(APT_RUNTIME) $(APT_TEST) $(APT_BENCH)

install: deps build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 target/release/banger target/release/bangerd $(DESTDIR)$(BINDIR)/
	install -m 0755 target/agent/$(AGENT_TARGET)/release/banger-agent $(DESTDIR)$(BINDIR)/
	install -d $(DESTDIR)$(MANDIR) $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	target/release/banger __manpages $(DESTDIR)$(MANDIR)
	target/release/banger completion bash > $(DESTDIR)$(BASHCOMPDIR)/banger
	target/release/banger completion zsh > $(DESTDIR)$(ZSHCOMPDIR)/_banger
	target/release/banger completion fish > $(DESTDIR)$(FISHCOMPDIR)/banger.fish
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/

uninstall:
	-$(BINDIR)/banger daemon stop 2>/dev/null
	rm -f $(DESTDIR)$(BINDIR)/banger $(DESTDIR)$(BINDIR)/bangerd $(DESTDIR)$(BINDIR)/banger-agent
	rm -f $(DESTDIR)$(MANDIR)/banger.1 $(DESTDIR)$(MANDIR)/banger-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/banger $(DESTDIR)$(ZSHCOMPDIR)/_banger $(DESTDIR)$(FISHCOMPDIR)/banger.fish
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "banger removed. Your data was left in place:"
	@echo "  $${XDG_CONFIG_HOME:-$$HOME/.config}/banger   (config, ssh keys)"
	@echo "  $${XDG_STATE_HOME:-$$HOME/.local/state}/banger   (images, kernels, VMs, database, log)"
	@echo "  $${XDG_CACHE_HOME:-$$HOME/.cache}/banger   (download cache)"

# Guest-booting tests run one at a time: TCG guests are CPU-bound and the machine has 2 cores.
test: test-deps
	$(CARGO) build --workspace --bins --tests
	$(MAKE) agent
	$(CARGO) test --workspace --exclude banger-e2e -- --test-threads=2
	$(CARGO) test -p banger-e2e -- --test-threads=1

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
