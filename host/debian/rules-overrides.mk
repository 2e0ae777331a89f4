# Appended by apppot_host/build_deb.py --host to the debian/rules that stdeb
# generates for apppot-host: what stdeb has no option for.

# The test suite runs from the checkout (tests/), not inside the package build.
export PYBUILD_DISABLE=test

# AppPot's static UML kernel (apppot-build-kernel; staged as ./linux), where
# apppot-start looks for it, and the guest package that apppot-build-image
# installs into images (staged under ./guest/).  apppot-build-image needs root:
# /usr/sbin.
override_dh_auto_install:
	dh_auto_install
	install -D -m 0755 linux debian/apppot-host/usr/lib/apppot/linux
	install -d debian/apppot-host/usr/share/apppot
	install -m 0644 guest/*.deb debian/apppot-host/usr/share/apppot/
	mkdir -p debian/apppot-host/usr/sbin
	mv debian/apppot-host/usr/bin/apppot-build-image debian/apppot-host/usr/sbin/apppot-build-image

# The kernel is built stripped and static: nothing for dh_strip, dh_dwz or dh_shlibdeps to do.
override_dh_strip override_dh_dwz override_dh_shlibdeps:

# Manual pages from the commands' own argparse parsers (apppot_guest/manpage.py).
override_dh_installman:
	mkdir -p debian/man
	/usr/bin/python3 -m apppot_guest.manpage apppot_host.start:build_parser 1 > debian/man/apppot-start.1
	/usr/bin/python3 -m apppot_guest.manpage apppot_host.submit:build_parser 1 > debian/man/apppot-submit.1
	/usr/bin/python3 -m apppot_guest.manpage apppot_host.build_image:build_parser 8 > debian/man/apppot-build-image.8
	dh_installman debian/man/apppot-start.1 debian/man/apppot-submit.1 debian/man/apppot-build-image.8
