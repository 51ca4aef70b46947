# The requests example from Segmind's Mixtral 8x22B page, verbatim; the test swaps in
# the host, the key and the image (a data URI, or a URL on an allow-listed host).
import requests

url = "https://api.segmind.com/v1/mixtral-8x22b-instruct"

headers = {"Authorization": "Bearer YOUR_API_KEY", "Content-Type": "application/json"}

data = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}},
            ],
        }
    ]
}

response = requests.post(url, json=data, headers=headers)
print(response.json())
