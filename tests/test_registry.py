import pytest

from raykd.registry import Registry, RegistryError


def test_registered_objects_are_found_by_name():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)

    @reg.register("beta")
    def beta():
        return 2

    assert reg.get("alpha") == 1 and reg.get("beta") is beta
    assert reg.names() == ["alpha", "beta"] and "beta" in reg and len(reg) == 2


def test_duplicate_name_is_an_error():
    reg: Registry[int] = Registry("thing")
    reg.add("alpha", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("alpha", 2)


def test_unknown_name_suggests_the_closest():
    reg: Registry[int] = Registry("distillation method")
    for name in ("fitnet", "kd", "crkd"):
        reg.add(name, 0)
    with pytest.raises(RegistryError) as err:
        reg.get("fitnett")
    assert "unknown distillation method 'fitnett'" in str(err.value)
    assert "Did you mean 'fitnet'" in str(err.value)
    assert "crkd, fitnet, kd" in str(err.value)
