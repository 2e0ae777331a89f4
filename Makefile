# AppPot: build the guest package and image, run the demo, the tests, the benchmarks.
# The two commands for a fresh Debian 12 machine (see README.md):
#   sudo make demo     build the package and image if missing, run a sample job in UML
#   sudo make check    run the whole test suite (unit and integration)

PY := /usr/bin/python3
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: deps check check-fast bench clean

deps:
	./scripts/install-deps

check: deps
	$(PY) -m pytest tests

check-fast: deps
	$(PY) -m pytest -m "not integration" tests

bench: deps
	$(PY) bench/bench_snap.py

clean:
	rm -rf build dist deb_dist out *.egg-info .pytest_cache .hypothesis

# The apppot Debian package (stdeb): out/apppot_<version>-1_all.deb (docs/package.md).
.PHONY: deb
deb: deps
	$(PY) scripts/build-deb
