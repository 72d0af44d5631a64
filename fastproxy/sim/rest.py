"""Bybit V5 REST market endpoints the proxy needs at start-up, as pure functions (sans-I/O)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from fastproxy.sim.instruments import Catalog, InstrumentSpec, fmt_fixed, step_units
from fastproxy.sim.jsonenc import go_dumps

DEFAULT_LIMIT = 500
MAX_LIMIT = 1000


def envelope(result: Any, now_ms: int, ret_code: int = 0, ret_msg: str = "OK") -> bytes:
    return go_dumps(
        {
            "retCode": ret_code,
            "retMsg": ret_msg,
            "result": result,
            "retExtInfo": {},
            "time": now_ms,
        }
    )


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset={offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    key, _, value = raw.partition("=")
    if key != "offset" or not value.isdigit():
        raise ValueError("invalid cursor")
    return int(value)


def _price_filter(spec: InstrumentSpec) -> dict[str, str]:
    max_ticks = round(spec.price * 40 / spec.tick)
    return {
        "minPrice": spec.tick_size,
        "maxPrice": spec.fmt_price(max_ticks),
        "tickSize": spec.tick_size,
    }


def _max_qty(spec: InstrumentSpec, factor: float) -> str:
    steps = max(1, int(spec.level_size * factor / float(spec.qty_step)))
    return fmt_fixed(steps * step_units(spec.qty_step), spec.qty_scale)


def instrument_item(spec: InstrumentSpec) -> dict[str, Any]:
    """One element of ``result.list`` in Bybit's field order for the instrument's category."""
    if spec.category == "spot":
        return {
            "symbol": spec.symbol,
            "baseCoin": spec.base_coin,
            "quoteCoin": spec.quote_coin,
            "innovation": "0",
            "status": "Trading",
            "marginTrading": "utaOnly",
            "stTag": "0",
            "lotSizeFilter": {
                "basePrecision": spec.qty_step,
                "quotePrecision": "0.00000001",
                "minOrderQty": spec.qty_step,
                "maxOrderQty": _max_qty(spec, 200),
                "minOrderAmt": "1",
                "maxOrderAmt": "4000000",
            },
            "priceFilter": {"tickSize": spec.tick_size},
            "riskParameters": {"priceLimitRatioX": "0.005", "priceLimitRatioY": "0.01"},
        }
    if spec.category == "option":
        return {
            "symbol": spec.symbol,
            "status": "Trading",
            "baseCoin": spec.base_coin,
            "quoteCoin": spec.quote_coin,
            "settleCoin": spec.settle_coin,
            "optionsType": spec.options_type,
            "launchTime": str(spec.launch_time),
            "deliveryTime": str(spec.delivery_time),
            "deliveryFeeRate": "0.00015",
            "priceFilter": _price_filter(spec),
            "lotSizeFilter": {"maxOrderQty": "500", "minOrderQty": "0.01", "qtyStep": "0.01"},
            "displayName": "",
        }
    return {
        "symbol": spec.symbol,
        "contractType": spec.contract_type,
        "status": "Trading",
        "baseCoin": spec.base_coin,
        "quoteCoin": spec.quote_coin,
        "launchTime": str(spec.launch_time),
        "deliveryTime": str(spec.delivery_time),
        "deliveryFeeRate": "" if spec.is_perpetual else "0.0005",
        "priceScale": str(spec.price_scale),
        "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
        "priceFilter": _price_filter(spec),
        "lotSizeFilter": {
            "maxOrderQty": _max_qty(spec, 500),
            "minOrderQty": spec.qty_step,
            "qtyStep": spec.qty_step,
            "postOnlyMaxOrderQty": _max_qty(spec, 500),
            "maxMktOrderQty": _max_qty(spec, 100),
            "minNotionalValue": "5" if spec.category == "linear" else "",
        },
        "unifiedMarginTrade": True,
        "fundingInterval": 480 if spec.is_perpetual else 0,
        "settleCoin": spec.settle_coin,
        "copyTrading": "both" if spec.category == "linear" else "none",
        "upperFundingRate": "0.005" if spec.is_perpetual else "",
        "lowerFundingRate": "-0.005" if spec.is_perpetual else "",
        "isPreListing": False,
        "preListingInfo": None,
        "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.1"},
        "displayName": "",
    }


def instruments_info(catalog: Catalog, query: Mapping[str, str], now_ms: int) -> bytes:
    """``GET /v5/market/instruments-info``; errors come back as retCode != 0 with HTTP 200."""
    category = query.get("category", "")
    if category not in ("linear", "inverse", "spot", "option"):
        return envelope({}, now_ms, 10001, "Illegal category")
    limit_text = query.get("limit", "")
    if limit_text:
        if not limit_text.isdigit():
            return envelope({}, now_ms, 10001, "params error: limit must be an integer")
        limit = min(max(int(limit_text), 1), MAX_LIMIT)
    else:
        limit = DEFAULT_LIMIT
    offset = 0
    cursor = query.get("cursor", "")
    if cursor:
        try:
            offset = _decode_cursor(cursor)
        except ValueError:
            return envelope({}, now_ms, 10001, "params error: cursor is invalid")
    specs = catalog.specs(category)
    symbol = query.get("symbol")
    if symbol:
        specs = [s for s in specs if s.symbol == symbol]
    base_coin = query.get("baseCoin")
    if base_coin:
        specs = [s for s in specs if s.base_coin == base_coin]
    status = query.get("status")
    if status and status != "Trading":
        specs = []
    page = specs[offset : offset + limit]
    more = offset + limit < len(specs)
    result = {
        "category": category,
        "list": [instrument_item(s) for s in page],
        "nextPageCursor": _encode_cursor(offset + limit) if more else "",
    }
    return envelope(result, now_ms)


def server_time(now_ns: int) -> bytes:
    """``GET /v5/market/time``."""
    result = {"timeSecond": str(now_ns // 1_000_000_000), "timeNano": str(now_ns)}
    return envelope(result, now_ns // 1_000_000)
