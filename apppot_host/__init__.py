"""AppPot's host side: the launcher, the VM process, the kernel and image builders, batch submission.

It shares one version and the protocol modules (kernel command line, status
record, exit codes, errors) with the guest package, ``apppot_guest``.
"""
