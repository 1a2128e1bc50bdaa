"""Runs a client test script's `test_*` functions in name order and prints `ok NAME` or
`FAILED NAME` with the traceback for each, then `N passed, M failed` (what the Rust tests that
start these scripts look for); exits 1 if any failed."""
import sys
import traceback


def run_tests(names):
    tests = [v for k, v in sorted(names.items()) if k.startswith("test_") and callable(v)]
    passed = failed = 0
    for t in tests:
        try:
            t()
            passed += 1
            print(f"ok {t.__name__}")
        except Exception:
            failed += 1
            print(f"FAILED {t.__name__}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
