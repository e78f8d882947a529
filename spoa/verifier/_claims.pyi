from typing import Any

def compact(
    table: dict[Any, Any], table_max: int, str_max: int, payload: dict[str, Any]
) -> dict[str, Any]: ...
