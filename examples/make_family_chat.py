"""Write examples/family_chat.txt: a made-up family group chat, as WhatsApp for Android exports it.

Three people with a voice each, written for this project (no text copied from anywhere):
- Mia, 16, in sixth form in Sheffield: lower case, emoji, several short messages in a row;
- Dad (Mia's dad), a signal engineer on the Sheffield trams: terse, full stops, dry;
- Grandma (Dad's mother), in Whitby by the sea: warm, long, signs her messages.

Facts come back across the weeks, so a persona's memory has something to recall: Biscuit the
beagle (steals socks, hates the vacuum), Mia's Saturday job at the Bean Counter café, volleyball on
Thursdays, her biology mock, her birthday on 4 November (17) and Grandma's lemon drizzle cake, Dad's
trams and his chilli, Grandma's neighbour Maureen, her bad knee and her garden.

The scenes are hand-written; the script only lays them out on dates and times (deterministic: the
same file every run) in the Android export's form `dd/mm/yyyy, HH:MM - Name: text`, a multi-line
message's later lines on lines of their own. Run from the repository root:

    python examples/make_family_chat.py        # writes examples/family_chat.txt
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path

M, D, G = "Mia", "Dad", "Grandma"

# (date, first message's time, [(who, text), ...]). Times between messages are drawn below.
SCENES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("2023-10-02", "07:41", [
        (D, "Biscuit has eaten one of your socks. The blue one."),
        (M, "NOOO not the blue ones 😭"),
        (M, "those were my good socks"),
        (D, "He seems fine. The sock less so."),
        (M, "is he actually ok tho"),
        (D, "He is asleep on the sofa looking pleased with himself."),
        (M, "ok good 😂 tell him i'm not mad"),
        (M, "ok i'm a bit mad"),
    ]),
    ("2023-10-02", "18:12", [
        (G, "Hello my darlings, just back from the shops. Whitby was blowing a gale today, I nearly lost my good umbrella on the pier! "
            "Maureen says it's going to be like this all week. How was everybody's Monday? Love Grandma xx"),
        (M, "hiii grandma!! monday was ok, we had a double biology which was kinda fun actually 🧬"),
        (D, "Monday was Monday."),
        (G, "Oh Tom you do make me laugh. Mia love, biology! Your grandad would have been so proud, he always said you'd be the scientist of the family. "
            "Are you still thinking about the marine biology? xx"),
        (M, "yesss still marine biology 🐬🐙 ms harper says i need to get my grades up in chemistry first tho"),
        (G, "You will, you're a clever girl. Now make sure your father feeds you something green this week. Love Grandma xx"),
        (D, "Peas count."),
        (M, "peas do NOT count dad"),
    ]),
    ("2023-10-03", "16:34", [
        (M, "dad can jess come round after school tmrw? we're doing the chem homework together"),
        (D, "Yes. No glitter."),
        (M, "that was ONE time"),
        (D, "I am still finding it."),
        (M, "🙄 fine no glitter"),
        (M, "can we have pizza tho"),
        (D, "We'll see."),
        (M, "that means yes 🍕🍕"),
    ]),
    ("2023-10-04", "20:05", [
        (G, "Quick question for my computer expert. I've had a message on the tablet saying it needs an update and I'm frightened to press it in case "
            "all my photos disappear. Maureen's son pressed his and lost his whole calendar. What do you think? xx"),
        (M, "grandma it's fine i promise!! your photos won't go anywhere, they're backed up"),
        (M, "just plug it in first so it doesn't die halfway 🔌"),
        (G, "Plug it in first. Right. I'm writing that down on my pad."),
        (G, "It's doing it now, there's a little wheel going round and round. I'll make a cup of tea while I wait. Thank you darling xx"),
        (M, "you're welcome!! 💕"),
        (D, "She rang me about it an hour ago. I said ask Mia."),
        (M, "classic dad"),
    ]),
    ("2023-10-05", "21:48", [
        (M, "WE WON 🏐🏐🏐"),
        (M, "3 sets to 1 against st. mary's!!!"),
        (M, "i got 4 aces in the last set omg"),
        (D, "Well done. Your knees ok?"),
        (M, "yeah they're fine just bruised lol"),
        (D, "Frozen peas are in the freezer. Told you peas count."),
        (M, "ok that was smooth i'll give you that 😂"),
        (G, "Oh well DONE Mia!! I knew you would. Four aces, I don't know exactly what that means but it sounds marvellous. "
            "I'm going to tell Maureen tomorrow, she'll be thrilled. Love Grandma xx"),
        (M, "it means i served and they couldn't even touch it 😎"),
        (G, "Good for you darling! Get some sleep now xx"),
    ]),
    ("2023-10-07", "08:15", [
        (M, "on my way to the bean counter ☕ first shift on my own today, manifesting no spilt lattes"),
        (D, "Don't put the milk jug under the steam wand too far."),
        (M, "since when do you know about steam wands"),
        (D, "I watched a video."),
        (M, "dad 💀"),
        (G, "Good luck at the café love! Remember, a smile costs nothing and the customers like a chat. When I worked at Woolworths "
            "in 1969 the manager told me that and I've never forgotten it. xx"),
    ]),
    ("2023-10-07", "16:40", [
        (M, "survived!!! 🎉"),
        (M, "only one spilt latte and it was on me not a customer so it doesn't count"),
        (M, "and a man tipped me £2 for drawing a heart in his foam 🥹"),
        (D, "Good. Are you home for tea?"),
        (M, "yess what are we having"),
        (D, "Chilli."),
        (M, "again? 😭 we had it on wednesday"),
        (D, "It's better on the second day. That's science."),
    ]),
    ("2023-10-08", "11:20", [
        (G, "Morning all. Lovely service at St Mary's this morning, the choir did 'All Things Bright and Beautiful' and I had a little cry, "
            "your grandad always loved that one. Then Maureen and I had scones at the Magpie. The jam was a bit thin this time, I'll not lie. "
            "Now my knee's playing up from all that standing so I'm putting my feet up with the crossword. xx"),
        (D, "Rest the knee. Have you rung the doctor about it?"),
        (G, "I will Tom, I will. It's only the damp. Don't fuss. xx"),
        (D, "You said that in August."),
        (M, "grandma pleasee ring them 🥺 we worry about you"),
        (G, "Alright alright, the pair of you! I'll ring them on Monday. Happy now? Love Grandma xx"),
        (M, "yes!! 💕"),
        (D, "Monday. I'll ask."),
    ]),
    ("2023-10-09", "13:02", [
        (M, "dad i think i left my pe kit on the kitchen table"),
        (M, "can you check"),
        (D, "It's here. Biscuit is lying on it."),
        (M, "omg can you bring it?? i have pe at 2 😭"),
        (D, "I'm at the depot until 5."),
        (M, "noooo ok i'll borrow jess's spare top"),
        (D, "Sorry love."),
    ]),
    ("2023-10-09", "18:30", [
        (G, "Well I rang the doctor like I promised. They can see me on the 19th. Ten days! In my day you saw the doctor the same morning "
            "and he knew your name. Still, it's booked. xx"),
        (D, "Good. Thank you."),
        (M, "yayyy proud of you grandma 🫶"),
        (G, "Don't be daft. It's only a phone call. xx"),
    ]),
    ("2023-10-10", "22:17", [
        (M, "dad are you awake"),
        (D, "Yes."),
        (M, "i'm so stressed about the bio mock 😩 it's in 3 weeks and i haven't even started the cell stuff"),
        (D, "Three weeks is a long time. Make a plan tomorrow. Sleep now."),
        (M, "what if i fail tho"),
        (D, "Then you'll resit it. It's a mock. That's what they're for."),
        (M, "ok"),
        (M, "thanks dad ❤️"),
        (D, "Night."),
    ]),
    ("2023-10-11", "19:45", [
        (D, "Tram failure at Cathedral. I'll be late. Chilli in the fridge. Feed the dog."),
        (M, "already fed him he was doing the sad eyes"),
        (D, "He always does the sad eyes. He's a beagle."),
        (M, "he's a beagle of GREAT emotional depth 🐶"),
        (D, "He's a beagle of great appetite."),
    ]),
    ("2023-10-12", "10:33", [
        (G, "I've been thinking what to make for Mia's birthday. Three weeks on Saturday, isn't it? Seventeen! I can hardly believe it. "
            "I remember holding you in the hospital in Sheffield, you were no bigger than a bag of sugar and you had your father's frown already. "
            "Is it still the lemon drizzle you'd like, or have you gone off it now you're grown up? xx"),
        (M, "GRANDMA it's ALWAYS lemon drizzle 🍋🍋🍋"),
        (M, "i will never go off it"),
        (M, "it's literally my favourite food in the whole world"),
        (G, "Then lemon drizzle it is. I'll do the big tin this time so your dad doesn't eat half of it before you've had a slice. xx"),
        (D, "I object to that."),
        (G, "You can object all you like Tom. I know you. xx"),
    ]),
    ("2023-10-12", "21:55", [
        (M, "volleyball was brutal today 😵 coach made us do 50 suicides because someone was late"),
        (M, "it wasn't even me"),
        (D, "Who was it?"),
        (M, "priya. she had a dentist thing so it's not her fault either"),
        (D, "Then it's the coach's fault."),
        (M, "exactly!! thank you 🙌"),
    ]),
    ("2023-10-14", "08:02", [
        (M, "bean counter again today ☕ if anyone wants a discount flat white come see me 😌"),
        (D, "I'll be in Meadowhall fixing points. Not close."),
        (G, "I'd come if it wasn't two hours on the bus love! Save me one in your head. xx"),
        (M, "saving you a hot chocolate with extra marshmallows in my head grandma 💭☕"),
        (G, "Perfect, that's my favourite. xx"),
    ]),
    ("2023-10-14", "17:20", [
        (M, "ok today was chaos"),
        (M, "the coffee machine broke at 11 and there was a queue out the DOOR"),
        (M, "and luca the manager just kept saying 'stay calm' while he was not calm at all 😂"),
        (D, "What was wrong with it?"),
        (M, "idk something with the pressure? it made a horrible noise"),
        (D, "Probably the pump. Or the boiler's scaled up. Tell him to descale it."),
        (M, "i'm not telling my manager to descale his machine dad 💀"),
        (D, "Someone should."),
    ]),
    ("2023-10-15", "14:10", [
        (G, "Just a little picture from the garden for you."),
        (G, "<Media omitted>"),
        (G, "The last of the dahlias. I'll have to lift them soon before the frost gets them, but with this knee I don't know how I'll manage. "
            "Maureen's grandson said he might come and help. He's a nice lad, very tall. xx"),
        (M, "they're so pretty 🌸🌸 the red ones are my favourite"),
        (D, "Don't lift them on your own. I can come up on Sunday the 29th."),
        (G, "Oh would you Tom? That would be lovely. I'll do a proper Sunday dinner. Beef. xx"),
        (D, "Deal."),
        (M, "wait can i come"),
        (G, "Of course you can darling, you don't need to ask! I'll make a lemon drizzle for practice. xx"),
        (M, "😍😍😍"),
    ]),
    ("2023-10-16", "07:55", [
        (D, "Biscuit got into the bin. Coffee grounds everywhere."),
        (M, "oh nooo is he ok??"),
        (D, "He's fine. The kitchen floor is not."),
        (M, "bad biscuit 😤"),
        (M, "(he's still a good boy tho)"),
        (D, "Debatable."),
    ]),
    ("2023-10-17", "20:40", [
        (M, "ok made a revision timetable 📚✨"),
        (M, "cells on mon, enzymes tue, transport wed, and then past papers every weekend"),
        (M, "colour coded obviously"),
        (D, "Good. Stick it on the fridge."),
        (M, "it's already on the fridge 😌"),
        (G, "Well aren't you organised! Your grandad used to do that for his exams at the railway, little cards with all the signals on. "
            "Mind you take breaks though love, all work and no play. xx"),
        (M, "i will!! breaks = walking biscuit 🐕"),
    ]),
    ("2023-10-18", "18:05", [
        (D, "Who left the back door open."),
        (M, "not me"),
        (D, "Biscuit is in next door's garden again."),
        (M, "OMG"),
        (M, "is mr patel mad"),
        (D, "Mr Patel is giving him ham."),
        (M, "😂😂😂 of course he is"),
        (D, "I've brought him back. He smells of ham."),
    ]),
    ("2023-10-19", "12:30", [
        (G, "Back from the doctor. It's arthritis in the knee, like I said it was, but he's given me some tablets and some exercises to do. "
            "Lifting my leg up and down while I watch Pointless. Honestly. He was very young, he looked about twelve. Nice though. xx"),
        (D, "Good. Do the exercises."),
        (M, "grandma i'm so glad you went 🥹 do the exercises!!! i'll do them with you on facetime if you want"),
        (G, "Oh that would be fun love! We could do them together on a Sunday. xx"),
        (M, "deal 🤝"),
        (D, "I'll ask on Sunday."),
        (G, "I know you will Tom. You always do. xx"),
    ]),
    ("2023-10-19", "21:35", [
        (M, "lost at volleyball 😔"),
        (M, "2-3 and the last set was 13-15 i'm so annoyed"),
        (D, "Close game. Next time."),
        (M, "yeah"),
        (M, "can we get chips on the way home tho"),
        (D, "Already in the car park."),
        (M, "best dad ever 🍟"),
    ]),
    ("2023-10-21", "08:10", [
        (M, "bean counter shift 3 let's gooo ☕"),
        (M, "luca said he descaled the machine btw"),
        (D, "Good man."),
        (M, "i didn't tell him you told me to tell him lol"),
        (D, "I'll take the credit anyway."),
    ]),
    ("2023-10-21", "19:10", [
        (G, "Is anybody watching Strictly? That young man in the blue was wonderful, I've voted twice. Maureen thinks he's too showy "
            "but Maureen thinks everybody's too showy. xx"),
        (M, "yesss we're watching!! i love him he's so good"),
        (D, "I'm watching. Under protest."),
        (M, "he literally said 'ooh' at the lift"),
        (D, "I did not."),
        (G, "Ha! I knew you'd come round to it Tom. Your father used to pretend he didn't like it too and then he'd cry at the foxtrot. xx"),
    ]),
    ("2023-10-22", "15:25", [
        (M, "walked biscuit in endcliffe park and he found a dead pigeon 🤢"),
        (M, "he tried to ROLL in it"),
        (D, "Did he succeed?"),
        (M, "partially"),
        (D, "Bath. Now. Use the old towels."),
        (M, "he's giving me the betrayed face 😭"),
        (D, "He'll forgive you by teatime."),
    ]),
    ("2023-10-23", "17:45", [
        (M, "got 71% on the chem test!!!! 🧪🧪"),
        (M, "that's a B!!"),
        (M, "ms harper wrote 'much improved' 🥹"),
        (D, "That's very good. Well done."),
        (D, "Very well done."),
        (M, "dad said it twice he must be proud 😂"),
        (G, "Seventy one! That's wonderful darling! I'm so proud of you I could burst. I always said you had your grandad's brain. "
            "We'll have an extra slice of cake on Sunday to celebrate. xx"),
        (M, "thank youuu 💕💕"),
    ]),
    ("2023-10-24", "21:02", [
        (D, "Did you take the last of the milk."),
        (M, "...maybe"),
        (M, "it was for the revision hot chocolate"),
        (D, "There is no milk for my tea in the morning."),
        (M, "i'll get some from the co-op on the way to school i promise 🥛"),
        (D, "Ok."),
    ]),
    ("2023-10-25", "19:00", [
        (G, "Just to say the forecast for Sunday in Whitby is dry, so bring your walking shoes. I thought we could go up the 199 steps "
            "to the abbey if my knee's up to it, and then fish and chips at the Magpie. Or I'll do the beef like I said. What do you both fancy? xx"),
        (M, "fish and chips at the magpie pleaseee 🐟🍟"),
        (D, "Either is good. Don't do the steps if the knee says no."),
        (G, "The knee will do as it's told. Fish and chips it is then, and I'll still make a lemon drizzle for after. xx"),
        (M, "you're the best grandma ever 🥰"),
    ]),
    ("2023-10-26", "16:50", [
        (M, "dad can i go to jess's bonfire party on the 5th? her mum's doing it in the garden"),
        (D, "Day after your birthday. Yes. Home by 10."),
        (M, "10:30??"),
        (D, "10."),
        (M, "10:15 🥺"),
        (D, "10. I'll pick you up."),
        (M, "ugh fine 🙄 thank you tho"),
    ]),
    ("2023-10-28", "21:30", [
        (M, "packing for whitby 🧳"),
        (M, "do i need my big coat"),
        (D, "Yes. It's the coast in October."),
        (M, "but it's so ugly"),
        (D, "The seagulls won't mind."),
        (M, "😂 ok ok big coat"),
        (D, "We leave at 8 tomorrow. Biscuit is coming."),
        (M, "YAY 🐶🌊"),
    ]),
    ("2023-10-29", "19:40", [
        (G, "Thank you both for coming today, it was the best Sunday I've had in a long time. The house feels very quiet now you've gone. "
            "Tom, thank you for doing the dahlias, they're all wrapped up in the shed. Mia, thank you for doing my knee exercises with me, "
            "I think I'm getting better at them. Biscuit has left a sock of yours under my sofa, I'll post it. Love you all. Grandma xx"),
        (M, "thank YOU grandma that was the best day ever 🥹🥹"),
        (M, "the lemon drizzle was unreal"),
        (M, "and biscuit loved the beach so much 🌊🐶"),
        (D, "Thank you for having us. Home safe. Rest the knee."),
        (G, "I will. Goodnight my darlings. xx"),
    ]),
    ("2023-10-30", "07:30", [
        (D, "Bio mock is Thursday?"),
        (M, "yeah 😬"),
        (D, "I'll make you a proper breakfast."),
        (M, "not chilli"),
        (D, "Not chilli."),
        (M, "ok then yes pls 🥞"),
    ]),
    ("2023-10-31", "20:15", [
        (M, "we've had 12 trick or treaters so far 🎃"),
        (M, "biscuit barked at every single one"),
        (D, "He thinks they've come for his biscuits."),
        (M, "a little girl dressed as a pumpkin gave HIM a treat 😭 he was so happy"),
        (D, "He has no shame."),
        (G, "Oh how lovely! We only get two or three up here, the hill puts them off. I give them a satsuma each and they look at me "
            "like I've gone mad. Maureen gives them full size chocolate bars, she's showing off. xx"),
        (M, "a satsuma 😂😂 grandma no"),
    ]),
    ("2023-11-01", "21:10", [
        (M, "can't sleep 😩 mock is tomorrow"),
        (D, "You've revised. You know it. Go to sleep."),
        (M, "what if they ask about the kidney"),
        (D, "Then you'll write about the kidney."),
        (M, "that's not helpful dad"),
        (D, "Phone down. Lights out."),
        (M, "ok ok goodnight 😴"),
        (G, "Goodnight darling and good luck tomorrow. Remember to read the question twice, your grandad always said that. "
            "I'll be thinking of you at nine o'clock. xx"),
    ]),
    ("2023-11-02", "12:50", [
        (M, "MOCK IS DONE 🎉🎉🎉"),
        (M, "they asked about the kidney 💀"),
        (M, "but i actually knew it??? the loop of henle came through"),
        (D, "Told you."),
        (M, "yeah yeah you were right"),
        (G, "Oh thank goodness! Well done my clever girl. I said a little prayer for you at nine. Now go and have some fun! xx"),
        (M, "thank you grandma 🥰 going to get bubble tea with jess to celebrate"),
    ]),
    ("2023-11-02", "21:40", [
        (M, "volleyball tonight was so fun, coach let us do a scrimmage the whole time 🏐"),
        (D, "Good. Knees?"),
        (M, "knees are fine dad 😂 you ask every single time"),
        (D, "And I'll keep asking."),
    ]),
    ("2023-11-03", "18:20", [
        (G, "Just to say I've posted a little parcel for Mia's birthday, it should come tomorrow morning. Don't open it before then! "
            "And the cake is in a separate tin, your father knows where. xx"),
        (D, "It's on top of the fridge. I haven't touched it."),
        (M, "has he touched it"),
        (D, "I have not."),
        (G, "I'll be asking for a full report on the state of that cake. xx"),
    ]),
    ("2023-11-04", "08:45", [
        (D, "Happy birthday Mia. Seventeen. Breakfast is downstairs."),
        (M, "THANK YOUUU 🎂🎂🎂"),
        (M, "wait is that pancakes i can smell"),
        (D, "It might be."),
        (G, "HAPPY BIRTHDAY my darling girl!!! Seventeen years old today. I'm so proud of the young woman you're becoming. "
            "Kind, clever, funny, and so good to your old grandma. Have a wonderful day and save me a slice of that cake.\n"
            "All my love,\nGrandma xxxxx"),
        (M, "grandma i'm crying 😭💕 thank you so much"),
        (M, "the parcel came!!! the dolphin necklace is so beautiful 🐬"),
        (G, "I'm so glad you like it. It's for my marine biologist. xx"),
    ]),
    ("2023-11-04", "22:05", [
        (M, "best birthday everrr"),
        (M, "jess and priya came round and we had the lemon drizzle and it's already half gone 🍋"),
        (D, "Not my fault. For once."),
        (G, "Half gone already! That's the sign of a good cake. I'll make another at Christmas. Happy birthday again love. xx"),
        (M, "thank you for everything 🥹🫶"),
    ]),
    ("2023-11-05", "22:03", [
        (M, "dad i'm outside jess's"),
        (D, "I know. I'm in the car. I can see you."),
        (M, "why didn't you say 😂"),
        (D, "I just did."),
    ]),
    ("2023-11-06", "19:30", [
        (G, "Did the fireworks frighten Biscuit? Maureen's cat hid under the bed all night and wouldn't come out for his tea. xx"),
        (M, "he was SO scared 😢 he sat on dad's feet the whole time"),
        (D, "He weighs a tonne."),
        (M, "dad kept stroking him though 🥹 don't let him pretend"),
        (D, "It was to keep my feet warm."),
        (G, "You big softie, Tom. You were the same with our old dog Sandy when you were a boy. xx"),
    ]),
    ("2023-11-07", "17:15", [
        (M, "mock results are back 👀"),
        (D, "And?"),
        (M, "A!!!!!!!!! 🅰️🅰️🅰️"),
        (M, "i got an A in bio omg"),
        (D, "Brilliant. I'm very proud of you."),
        (M, "dad 🥹"),
        (G, "An A!!! Oh Mia, that's wonderful, wonderful news. I've just told Maureen over the fence and she's told the postman. "
            "The whole street will know by teatime. Your grandad would be over the moon. xx"),
        (M, "grandma 😂💕 thank you!!"),
        (D, "Chilli to celebrate?"),
        (M, "absolutely not 😂 we're getting ramen"),
        (D, "Fine. Ramen."),
    ]),
    ("2023-11-08", "07:20", [
        (D, "Tram strike today. I'm working from home."),
        (M, "so you'll walk biscuit at lunch?"),
        (D, "I will walk Biscuit at lunch."),
        (M, "make sure he doesn't eat any socks 🧦"),
        (D, "No promises."),
    ]),
    ("2023-11-09", "20:00", [
        (G, "A little update from Whitby. My knee is much better with the tablets and the exercises, I walked to the harbour and back "
            "today without stopping once! Maureen couldn't keep up. Thank you both for nagging me. xx"),
        (D, "Good news. Keep it up."),
        (M, "yayyyy grandma 💪💪 so proud of you"),
        (G, "And Mia, thank you for doing the exercises with me on a Sunday, it's the highlight of my week. Love Grandma xx"),
        (M, "mine too 🥰"),
    ]),
    ("2023-11-10", "18:45", [
        (M, "dad what time are you home"),
        (D, "Half six. Why."),
        (M, "no reason"),
        (D, "Mia."),
        (M, "ok biscuit might have eaten part of the remote"),
        (D, "Which part."),
        (M, "the buttons 😬"),
        (D, "All of them?"),
        (M, "just the volume ones"),
        (D, "We'll never be able to turn the telly down again."),
        (M, "tbf you always have it on 12 anyway"),
    ]),
    ("2023-11-11", "16:30", [
        (M, "luca asked if i want more shifts at the bean counter over christmas ☕🎄"),
        (M, "like sundays too"),
        (D, "If your schoolwork's fine, yes. Not every Sunday."),
        (M, "ok not every sunday 🙏 i still need to do grandma's knee exercises"),
        (G, "Don't you give up your money for me love! We can do them on a Saturday evening instead. xx"),
        (M, "no sundays are OUR day grandma 💕"),
        (G, "Oh you'll have me in tears. xx"),
    ]),
    ("2023-11-12", "13:10", [
        (G, "Sunday exercises done! Twenty leg lifts today, Mia counted them out on the tablet. And then we talked for an hour about dolphins. "
            "Did you know they have names for each other? Mia told me. Isn't that something. xx"),
        (M, "they literally do!! signature whistles 🐬"),
        (D, "Biscuit has a name for me. It's a bark that means 'food'."),
        (M, "😂😂😂 that's every bark"),
    ]),
    ("2023-11-13", "21:25", [
        (M, "dad can we have something that's not chilli this week pls"),
        (D, "Like what."),
        (M, "literally anything 😭 pasta? curry? a salad??"),
        (D, "A salad is not tea."),
        (M, "GRANDMA tell him"),
        (G, "Tom, feed that girl a vegetable. Here's my cottage pie, it's got carrots AND peas in it.\n"
            "Mince, an onion, two carrots, a handful of peas, a splash of Worcestershire sauce, gravy.\n"
            "Mash on top with a bit of butter and cheese, forty minutes in the oven. xx"),
        (D, "Peas count."),
        (M, "oh my god 😂"),
    ]),
    ("2023-11-14", "18:00", [
        (D, "Made the cottage pie. It's in the oven."),
        (M, "WAIT really?? 😍"),
        (D, "Don't make a fuss."),
        (M, "i'm making a fuss 🥳🥳"),
        (G, "Well done Tom! Did you put a bit of Worcestershire sauce in like I said? xx"),
        (D, "Yes. And extra peas."),
        (M, "he's obsessed with peas grandma"),
    ]),
    ("2023-11-16", "21:50", [
        (M, "volleyball tonight!! we beat st. mary's AGAIN 🏐🔥"),
        (M, "coach says i might be captain next term 👀"),
        (D, "That's great news. Knees?"),
        (M, "DAD 😂😂"),
        (D, "Had to."),
        (G, "Captain! Just like your grandad was captain of the railway darts team. It runs in the family. xx"),
        (M, "wait grandad played darts??"),
        (G, "Every Friday at the Station Inn for thirty years. He was very good, but don't tell your father I said so, he was hopeless. xx"),
        (D, "I was eleven."),
    ]),
    ("2023-11-18", "12:15", [
        (M, "quiet day at the bean counter so i'm doing chem flashcards behind the counter 📚"),
        (M, "luca pretends not to see"),
        (D, "Good. Both of you."),
        (G, "Clever girl. Work hard and keep smiling, that's all anyone can ask. xx"),
    ]),
    ("2023-11-19", "16:05", [
        (G, "The first frost this morning. The garden looked like icing sugar. So glad Tom lifted those dahlias when he did, "
            "they'd have been done for. I've put a blanket over the rosemary. xx"),
        (D, "Good timing. Keep warm."),
        (M, "that sounds so pretty ❄️ send a pic grandma"),
        (G, "<Media omitted>"),
        (M, "omg it's like a christmas card 😍"),
        (G, "Now, who's coming for Christmas? I need to know how big a turkey to order from Hendersons. xx"),
        (D, "Both of us. And Biscuit."),
        (M, "and lots of lemon drizzle pls 🍋🎄"),
        (G, "Two cakes then. One for Mia and one for Tom to pretend he isn't eating. xx"),
    ]),
]


def render() -> str:
    """The export's text: the group's system lines, then every scene's messages on its date."""
    rng = random.Random(17)  # the same gaps every run: the file never changes unless the scenes do
    lines = ["01/10/2023, 19:02 - Messages and calls are end-to-end encrypted. No one outside of this chat, "
             "not even WhatsApp, can read or listen to them. Tap to learn more.",
             "01/10/2023, 19:02 - Dad created group \"Family 🏡\"",
             "01/10/2023, 19:03 - Dad added Mia",
             "01/10/2023, 19:03 - Dad added Grandma"]
    for day, start, turns in SCENES:
        at = datetime.fromisoformat(f"{day} {start}")
        for i, (who, text) in enumerate(turns):
            if i:
                at += timedelta(minutes=rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 9]))
            lines.append(f"{at:%d/%m/%Y, %H:%M} - {who}: {text}")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(__file__).with_name("family_chat.txt")
    out.write_text(render(), encoding="utf-8")
    counts = {who: sum(t[0] == who for _, _, turns in SCENES for t in turns) for who in (M, D, G)}
    print(f"{out}: {sum(counts.values())} messages", counts)


if __name__ == "__main__":
    main()
