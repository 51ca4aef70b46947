# The requests example from Segmind's Mixtral 8x22B page with its image block left out
# (the image variant needs a vision model; see the media tests). The test swaps in the
# host and the key.
import requests

url = "https://api.segmind.com/v1/mixtral-8x22b-instruct"

headers = {"Authorization": "Bearer YOUR_API_KEY", "Content-Type": "application/json"}

data = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},
            ],
        }
    ]
}

response = requests.post(url, json=data, headers=headers)
print(response.json())
