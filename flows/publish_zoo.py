"""publish_zoo: upload a built zoo preset (bases, experts, multitask models) to the artifact
store, each model with its manifest, and the preset's index with the published URIs beside them.

The published index (`<artifacts>/zoo/<preset>.json`) is what merge requests point at: its
families give the base, experts and multitask model of each base as s3:// URIs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from mergeflow.publish import published_index, zoo_destinations
from mergeflow.settings import load_settings
from mergeflow.zoo.build import load_index
from tasks.credentials import load_credentials
from tasks.publish import publish_model, save_index


class PublishRequest(BaseModel):
    preset: str = Field("tiny", description="A built zoo preset (mergeflow zoo build --preset NAME)")
    artifacts: str | None = Field(None, description="Store to publish to; default from mergeflow settings")


@flow(name="publish-zoo", log_prints=True)
def publish_zoo(request: PublishRequest) -> dict:
    """Returns the published index."""
    load_credentials()
    root = request.artifacts or load_settings().artifacts
    index = load_index(request.preset)
    destinations = zoo_destinations(index, root)
    futures = publish_model.map([Path(folder) for folder in destinations], list(destinations.values()))
    for future in futures:
        future.result()
    published = published_index(index, destinations)
    uri = save_index(published, f"{root.rstrip('/')}/zoo/{request.preset}.json")
    print(f"published {len(destinations)} models of zoo preset {request.preset!r}; index: {uri}")
    return published


if __name__ == "__main__":
    # python -m flows.publish_zoo request.json: publish, print the published index as JSON.
    print(
        json.dumps(publish_zoo(PublishRequest.model_validate_json(Path(sys.argv[1]).read_text())), indent=2)
    )
