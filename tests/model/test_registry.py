import pytest

from model.registry import Registry, import_dotted


def test_register_get_and_duplicate():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a
    assert "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", a)


def test_unknown_name_lists_known():
    reg = Registry("thing")
    reg.add("x", 1)
    with pytest.raises(KeyError, match=r"unknown thing 'y'; known: x"):
        reg.get("y")


def test_lazy_entry_imported_on_first_get():
    reg = Registry("thing")
    reg.register_lazy("join", "os.path:join")
    import os.path

    assert reg.get("join") is os.path.join
    with pytest.raises(ValueError, match="already registered"):
        reg.register_lazy("join", "os.path:join")


def test_import_dotted_errors():
    assert import_dotted("os.path.join").__name__ == "join"
    with pytest.raises(ValueError, match="cannot import module"):
        import_dotted("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        import_dotted("os.path:no_such_fn")
    with pytest.raises(ValueError, match="expected a dotted path"):
        import_dotted("nodots")
