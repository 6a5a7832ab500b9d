"""Running untrusted Python: the runner that starts a program (or a program and its tester) in
throw-away sandboxes and reports what protected it (`runner`), the launcher that isolates
itself and execs the interpreter (`launcher`, standard library only), and the Python-level
guards run inside before the program (`guards`, passed as text: the package is not importable
in the sandbox)."""
