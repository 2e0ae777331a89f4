# AppPot: build the guest package and image, run the demo, the tests, the benchmarks.
# The two commands for a fresh Debian 12 machine (see README.md):
#   sudo make demo     build the package and image if missing, run a sample job in UML
#   sudo make check    run the whole test suite (unit and integration)

PY := /usr/bin/python3
export PYTHONDONTWRITEBYTECODE := 1
# The checkout's packages (apppot_guest, apppot_host) for the benchmarks and `python3 -m apppot_host.X`.
export PYTHONPATH := $(CURDIR)

.PHONY: deps check check-fast bench bench-scale clean

deps:
	./scripts/install-deps

check: deps kernel
	$(PY) -m pytest tests

check-fast: deps
	$(PY) -m pytest -m "not integration" tests

bench: deps
	$(PY) bench/bench_snap.py

# apppot-snap on synthetic trees of 100k, 300k and 1M entries against GNU tar (about 6 GB in /var/tmp, removed afterwards).
bench-scale: deps
	$(PY) bench/bench_snap.py --scale

clean:
	rm -rf build dist deb_dist out *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache

# The Debian packages (stdeb, docs/package.md): the guest's out/apppot_<version>-1_all.deb and the
# host's out/apppot-host_<version>-1_<arch>.deb (launcher, image builder, AppPot's kernel, the guest package).
.PHONY: deb
deb: deps kernel
	$(PY) -m apppot_host.build_deb --host

# AppPot's static UML kernel: out/linux (apppot-build-kernel; cached under
# ~/.cache/apppot/kernel, so this is quick once built).
.PHONY: kernel
kernel: deps
	$(PY) ./apppot-build-kernel

# The AppPot image and the host launcher (docs/host.md).  `make image` always
# rebuilds; `demo` and `bench-boot` build it only when it is missing.
IMAGE ?= out/apppot.img
DEMO_DIR := out/demo
# apppot-start is for ordinary users: the demo runs it as the user who ran sudo (else uid 1000).
DEMO_UID := $(or $(SUDO_UID),1000)
DEMO_GID := $(or $(SUDO_GID),1000)
DEMO_AS := setpriv --reuid=$(DEMO_UID) --regid=$(DEMO_GID) --clear-groups
IMAGE_BOOKWORM ?= out/apppot-bookworm.img
.PHONY: image demo bench-boot bench-images example
image: deps
	mkdir -p $(dir $(IMAGE))
	deb=$$($(PY) -m apppot_host.build_deb) && $(PY) ./apppot-build-image --deb "$$deb" --output $(IMAGE)

$(IMAGE):
	$(MAKE) image IMAGE=$(IMAGE)

demo: deps kernel $(IMAGE)
	@mkdir -p $(DEMO_DIR)
	@chown $(DEMO_UID):$(DEMO_GID) $(DEMO_DIR)
	@printf '%s\n' '#include <stdio.h>' 'int main(void) { puts("hello from a program compiled inside AppPot"); return 3; }' > $(DEMO_DIR)/hello.c
	@echo "demo (as uid $(DEMO_UID)): ./apppot-start --image $(IMAGE) --jobdir $(DEMO_DIR) -- sh -c 'uname -sr; id; gcc -o hello hello.c && ./hello'"
	@$(DEMO_AS) ./apppot-start --image $(IMAGE) --jobdir $(DEMO_DIR) -- sh -c 'uname -sr; id; gcc -o hello hello.c && ./hello'; \
	  echo "demo: apppot-start exited with $$? (the job's own exit code); $(DEMO_DIR)/apppot.status.json says:"
	@cat $(DEMO_DIR)/apppot.status.json

bench-boot: deps kernel $(IMAGE)
	$(PY) bench/bench_boot.py --image $(IMAGE) --write docs/benchmarks.md

# The images of both suites side by side: size, packages, boot (docs/benchmarks.md).
$(IMAGE_BOOKWORM):
	mkdir -p $(dir $@)
	deb=$$($(PY) -m apppot_host.build_deb) && $(PY) ./apppot-build-image --suite bookworm --deb "$$deb" --output $@

bench-images: deps kernel $(IMAGE) $(IMAGE_BOOKWORM)
	$(PY) bench/bench_images.py trixie=$(IMAGE) bookworm=$(IMAGE_BOOKWORM) --write docs/benchmarks.md

# The worked example (examples/gauss, README): build a numerical code in a desktop
# copy of the image, save the delta, run jobs on the pristine image (out/example/):
# a Slurm job array through apppot-submit when sinfo answers, else one job after another.
example: deps kernel $(IMAGE)
	@rm -rf out/example && mkdir -p out/example && chown $(DEMO_UID):$(DEMO_GID) out/example
	$(DEMO_AS) examples/gauss/run-example $(IMAGE) out/example
