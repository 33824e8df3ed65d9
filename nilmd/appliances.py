"""The 11 appliances nilmd knows, in the fixed order of every prediction (docs/CONTRACT.md §8.1)."""

APPLIANCES = (
    "HeatPump",
    "Dishwasher",
    "WashingMachine",
    "Dryer",
    "Freezer",
    "Refrigerator",
    "ElectricOven",
    "Microwave",
    "ElectricKettle",
    "Computer",
    "Television",
)

# On-power thresholds (W) that define "on" for F1 scoring and for the on/off training target.
# Kettle, microwave, fridge, washing machine and dishwasher are the customary NILM values
# (Kelly & Knottenbelt; BERT4NILM); the others are ours, set well above each appliance's
# standby draw and well below its running draw.
ON_THRESHOLD_W = {
    "HeatPump": 300.0,
    "Dishwasher": 10.0,
    "WashingMachine": 20.0,
    "Dryer": 100.0,
    "Freezer": 50.0,
    "Refrigerator": 50.0,
    "ElectricOven": 200.0,
    "Microwave": 200.0,
    "ElectricKettle": 2000.0,
    "Computer": 20.0,
    "Television": 30.0,
}


def checkpoint_filename(appliance: str) -> str:
    return f"wavenilm_v3_SOTA_{appliance}_best.pth"


# Column names of other datasets (REFIT, UK-DALE, tracebase kinds) -> nilmd appliance names.
ALIASES = {
    "kettle": "ElectricKettle", "waterkettle": "ElectricKettle", "microwave": "Microwave",
    "microwaveoven": "Microwave", "dishwasher": "Dishwasher", "dish_washer": "Dishwasher",
    "washingmachine": "WashingMachine", "washing_machine": "WashingMachine", "washer_dryer": "WashingMachine",
    "fridge": "Refrigerator", "fridge_freezer": "Refrigerator", "refrigerator": "Refrigerator",
    "freezer": "Freezer", "dryer": "Dryer", "tumble_dryer": "Dryer", "laundrydryer": "Dryer",
    "laundrydrier": "Dryer", "oven": "ElectricOven", "electric_oven": "ElectricOven", "cookingstove": "ElectricOven",
    "heat_pump": "HeatPump", "heatpump": "HeatPump", "computer": "Computer", "pc-desktop": "Computer",
    "tv": "Television", "television": "Television", "tv-lcd": "Television", "tv-crt": "Television",
}


def appliance_name(column: str) -> str | None:
    """A column or dataset name -> the nilmd appliance it measures, or None."""
    if column in APPLIANCES:
        return column
    return ALIASES.get(column.strip().lower())
