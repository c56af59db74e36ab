"""Flag authoring: YAML files a person writes and reviews, compiled into resolver state."""
