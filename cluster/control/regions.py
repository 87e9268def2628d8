"""Azure regions as georeg knows them: name, where it is, its paired region,
whether it has availability zones, and whether its data is confined to it.

Coordinates are the ones Azure publishes for each region (``az account
list-locations``), rounded; pairs follow Microsoft's cross-region
replication pairs (some are one-way: westus3 → eastus, brazilsouth →
southcentralus). Regions that Microsoft lists without a pair have none here.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    display: str
    latitude: float
    longitude: float
    pair: str | None
    zones: bool                    # has availability zones (zone redundancy possible)
    geography: str


_TABLE = [
    # name, display, lat, lon, pair, zones, geography
    ("eastus", "East US", 37.3719, -79.8164, "westus", True, "United States"),
    ("eastus2", "East US 2", 36.6681, -78.3889, "centralus", True, "United States"),
    ("westus", "West US", 37.783, -122.417, "eastus", False, "United States"),
    ("westus2", "West US 2", 47.233, -119.852, "westcentralus", True, "United States"),
    ("westus3", "West US 3", 33.448, -112.074, "eastus", True, "United States"),
    ("centralus", "Central US", 41.5908, -93.6208, "eastus2", True, "United States"),
    ("northcentralus", "North Central US", 41.8819, -87.6278, "southcentralus", False, "United States"),
    ("southcentralus", "South Central US", 29.4167, -98.5, "northcentralus", True, "United States"),
    ("westcentralus", "West Central US", 40.890, -110.234, "westus2", False, "United States"),
    ("canadacentral", "Canada Central", 43.653, -79.383, "canadaeast", True, "Canada"),
    ("canadaeast", "Canada East", 46.817, -71.217, "canadacentral", False, "Canada"),
    ("mexicocentral", "Mexico Central", 20.589, -100.390, None, True, "Mexico"),
    ("brazilsouth", "Brazil South", -23.55, -46.633, "southcentralus", True, "Brazil"),
    ("northeurope", "North Europe", 53.3478, -6.2597, "westeurope", True, "Europe"),
    ("westeurope", "West Europe", 52.3667, 4.9, "northeurope", True, "Europe"),
    ("uksouth", "UK South", 50.941, -0.799, "ukwest", True, "United Kingdom"),
    ("ukwest", "UK West", 53.427, -3.084, "uksouth", False, "United Kingdom"),
    ("francecentral", "France Central", 46.3772, 2.3730, "francesouth", True, "France"),
    ("francesouth", "France South", 43.8345, 2.1972, "francecentral", False, "France"),
    ("germanywestcentral", "Germany West Central", 50.1109, 8.6821, "germanynorth", True, "Germany"),
    ("germanynorth", "Germany North", 53.0736, 8.8064, "germanywestcentral", False, "Germany"),
    ("norwayeast", "Norway East", 59.9139, 10.7522, "norwaywest", True, "Norway"),
    ("norwaywest", "Norway West", 58.9700, 5.7331, "norwayeast", False, "Norway"),
    ("switzerlandnorth", "Switzerland North", 47.4515, 8.5646, "switzerlandwest", True, "Switzerland"),
    ("switzerlandwest", "Switzerland West", 46.2044, 6.1432, "switzerlandnorth", False, "Switzerland"),
    ("swedencentral", "Sweden Central", 60.6749, 17.1413, "swedensouth", True, "Sweden"),
    ("swedensouth", "Sweden South", 55.6059, 13.0007, "swedencentral", False, "Sweden"),
    ("polandcentral", "Poland Central", 52.2333, 21.0167, None, True, "Poland"),
    ("italynorth", "Italy North", 45.4689, 9.1811, None, True, "Italy"),
    ("spaincentral", "Spain Central", 40.4259, -3.4209, None, True, "Spain"),
    ("uaenorth", "UAE North", 25.2667, 55.3167, "uaecentral", True, "UAE"),
    ("uaecentral", "UAE Central", 24.4667, 54.3667, "uaenorth", False, "UAE"),
    ("qatarcentral", "Qatar Central", 25.5515, 51.4393, None, True, "Qatar"),
    ("israelcentral", "Israel Central", 31.2656, 33.4507, None, True, "Israel"),
    ("southafricanorth", "South Africa North", -25.7313, 28.2184, "southafricawest", True, "South Africa"),
    ("southafricawest", "South Africa West", -34.0757, 18.8433, "southafricanorth", False, "South Africa"),
    ("centralindia", "Central India", 18.5822, 73.9197, "southindia", True, "India"),
    ("southindia", "South India", 12.9822, 80.1636, "centralindia", False, "India"),
    ("westindia", "West India", 19.088, 72.868, "southindia", False, "India"),
    ("southeastasia", "Southeast Asia", 1.283, 103.833, "eastasia", True, "Asia Pacific"),
    ("eastasia", "East Asia", 22.267, 114.188, "southeastasia", True, "Asia Pacific"),
    ("japaneast", "Japan East", 35.68, 139.77, "japanwest", True, "Japan"),
    ("japanwest", "Japan West", 34.6939, 135.5022, "japaneast", False, "Japan"),
    ("koreacentral", "Korea Central", 37.5665, 126.978, "koreasouth", True, "Korea"),
    ("koreasouth", "Korea South", 35.1796, 129.0756, "koreacentral", False, "Korea"),
    ("australiaeast", "Australia East", -33.86, 151.2094, "australiasoutheast", True, "Australia"),
    ("australiasoutheast", "Australia Southeast", -37.8136, 144.9631, "australiaeast", False, "Australia"),
    ("australiacentral", "Australia Central", -35.3075, 149.1244, "australiacentral2", False, "Australia"),
    ("australiacentral2", "Australia Central 2", -35.3075, 149.1244, "australiacentral", False, "Australia"),
    ("newzealandnorth", "New Zealand North", -36.8485, 174.7635, None, True, "New Zealand"),
]

REGIONS: dict[str, Region] = {row[0]: Region(*row) for row in _TABLE}

# Azure keeps these regions' data in the region, with no paired-region copy.
CONFINED_BY_DEFAULT = ("brazilsouth", "southeastasia")


class UnknownRegion(ValueError):
    pass


def region(name: str) -> Region:
    try:
        return REGIONS[name]
    except KeyError:
        raise UnknownRegion(unknown_region_message(name)) from None


def unknown_region_message(name: str) -> str:
    close = difflib.get_close_matches(name.lower().replace(" ", ""), REGIONS, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        "; region names are Azure's, lowercase without spaces, e.g. eastus, westeurope"
    return f"unknown region {name!r}{hint}"


def distance_km(a: str, b: str) -> float:
    """Great-circle distance between two regions (haversine, mean Earth radius)."""
    ra, rb = region(a), region(b)
    lat1, lon1, lat2, lon2 = map(math.radians, (ra.latitude, ra.longitude, rb.latitude, rb.longitude))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))
