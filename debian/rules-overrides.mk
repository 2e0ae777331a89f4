# Appended by apppot_host/build_deb.py to the debian/rules that stdeb generates: the
# parts of the apppot package that stdeb has no option for.

# The test suite runs from the checkout (tests/), not inside the package build.
export PYBUILD_DISABLE=test

# apppot-init is run by the boot (the systemd unit and the init script), never
# by a user: it belongs in /usr/sbin.
override_dh_auto_install:
	dh_auto_install
	mkdir -p debian/apppot/usr/sbin
	mv debian/apppot/usr/bin/apppot-init debian/apppot/usr/sbin/apppot-init

# Enable the unit (debian/apppot.service) and the LSB init script
# (debian/apppot.init) on install, but never start, stop or restart them while
# dpkg runs: apppot-init runs a job only when the image boots.
override_dh_installsystemd:
	dh_installsystemd --no-start --no-stop-on-upgrade

override_dh_installinit:
	dh_installinit --no-start --no-stop-on-upgrade

# Manual pages made from the commands' own argparse parsers (apppot_guest/manpage.py):
# they say exactly what --help says.
override_dh_installman:
	mkdir -p debian/man
	/usr/bin/python3 -m apppot_guest.manpage apppot_guest.snap:build_parser 1 > debian/man/apppot-snap.1
	/usr/bin/python3 -m apppot_guest.manpage apppot_guest.init:make_parser 8 > debian/man/apppot-init.8
	dh_installman debian/man/apppot-snap.1 debian/man/apppot-init.8
