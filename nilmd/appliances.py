"""The 11 appliances nilmd knows, in the fixed order of every prediction (SPEC §4)."""

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
